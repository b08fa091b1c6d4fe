"""A/B of planned kernels inside a whole model: with and without some candidates, one process.

    python benchmarks/bench_kernel_ab.py [--without onednn] [--dtype fp32|bf16] [--arch rwkv4|rwkv7]
                                         [--batches 1,8,32] [--prefill 16,64,1024] [--rounds 5]

Two copies of a model (random weights, the 169M RWKV-4 shape or RWKV-7 G1 0.1B): one with this
machine's plan, one with the plan chosen again from the same timings without the named kernels
(``--without fp16_packed`` for fbgemm's fp16 product, ``onednn`` for oneDNN's packed one). They
take turns: decode 8 steps a round per batch size, then read prompts of each length (a fresh
state each). Prints median tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rwkvpy.checkpoint import save_native
from rwkvpy.loading import load
from rwkvpy.models import RWKV4Config, RWKV7Config, random_state_dict
from rwkvpy.ops import plan
from rwkvpy.ops.linear import Linear, _kind


def replan_without(model, kernels: set[str]) -> None:
    planner = plan.Planner()
    for m in model.modules():
        if isinstance(m, Linear) and m.kernels is not None:
            need = plan.Need(_kind(m), m.out_features, m.in_features, m.unbounded_input, True)
            entry = planner.entries([need])[need]
            kept = {"timings": {k: v for k, v in entry["timings"].items()
                                if plan.Candidate.parse(k).kernel not in kernels}, "rejected": {}}
            choice = plan.choose(kept)
            assert (choice.dtype, choice.layout) == (str(m.weight.dtype).removeprefix("torch."),
                                                     "out_in" if m.weight.stride(1) == 1 else "in_out"), \
                "the storage would change too: compare two loads instead"
            m.kernels = tuple(plan.KERNELS[k] for k in choice.kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--without", default="onednn", help="kernel names, comma separated")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--arch", choices=("rwkv4", "rwkv7"), default="rwkv4")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", default="16,64,1024")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = (RWKV7Config(vocab_size=65536, n_embd=768, n_layer=12) if args.arch == "rwkv7"
           else RWKV4Config(vocab_size=50277, n_embd=768, n_layer=12))
    kw = {"dtype": "bf16"} if args.dtype == "bf16" else {}
    without = set(args.without.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        save_native(cfg, random_state_dict(cfg, seed=0), Path(tmp) / "m")
        models = {"planned": load(Path(tmp) / "m", **kw), f"without {args.without}": load(Path(tmp) / "m", **kw)}
    replan_without(models[f"without {args.without}"], without)
    print(f"{args.arch} {args.dtype}, {torch.get_num_threads()} threads, CPU flags: {plan.cpu_flags()}")
    tasks = [(f"decode batch {B}", B, 1) for B in map(int, args.batches.split(","))]
    tasks += [(f"prefill {T}", 1, T) for T in map(int, args.prefill.split(","))]
    V = cfg.vocab_size
    with torch.no_grad():
        for label, B, T in tasks:
            rates = {name: [] for name in models}
            for r in range(args.rounds + 1):
                for name, model in models.items():
                    if T == 1:
                        tok = torch.ones(B, dtype=torch.long)
                        _, s = model.step(tok)
                        t0 = time.perf_counter()
                        for _ in range(8):
                            _, s = model.step(tok, s)
                        n = 8 * B
                    else:
                        ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(r))
                        t0 = time.perf_counter()
                        model(ids, last_only=True)
                        n = T
                    if r:  # the first round warms up
                        rates[name].append(n / (time.perf_counter() - t0))
            med = {n: statistics.median(v) for n, v in rates.items()}
            a, b = med.values()
            print(f"{label:18s} " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in med.items()) + f"  ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
