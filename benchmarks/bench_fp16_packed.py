"""Batched bf16 decoding with and without fbgemm's fp16-weight product, in one process.

    python benchmarks/bench_fp16_packed.py [--batches 1,8,16] [--rounds 5]

Two copies of a bf16 model (random weights, the 169M RWKV-4 shape, stored as fp16 where the
plan says so): one with this machine's plan, one with the plan chosen again from the same
timings without the ``fp16_packed`` candidates. They decode in turn, 8 steps a round; prints
median tokens/s per batch size.
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
from rwkvpy.models import RWKV4Config, random_state_dict
from rwkvpy.ops import plan
from rwkvpy.ops.linear import Linear, _kind


def without_packed(model) -> None:
    planner = plan.Planner()
    for m in model.modules():
        if isinstance(m, Linear) and m.kernels is not None:
            need = plan.Need(_kind(m), m.out_features, m.in_features, m.unbounded_input, True)
            entry = planner.entries([need])[need]
            kept = {"timings": {k: v for k, v in entry["timings"].items() if not k.endswith("/fp16_packed")},
                    "rejected": {}}
            m.kernels = tuple(plan.KERNELS[k] for k in plan.choose(kept).kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = RWKV4Config(vocab_size=50277, n_embd=768, n_layer=12)
    with tempfile.TemporaryDirectory() as tmp:
        save_native(cfg, random_state_dict(cfg, seed=0), Path(tmp) / "m")
        models = {"with fp16_packed": load(Path(tmp) / "m", dtype="bf16"),
                  "without": load(Path(tmp) / "m", dtype="bf16")}
    without_packed(models["without"])
    with torch.no_grad():
        for B in map(int, args.batches.split(",")):
            tok = torch.ones(B, dtype=torch.long)
            rates = {name: [] for name in models}
            for r in range(args.rounds + 1):
                for name, model in models.items():
                    _, s = model.step(tok)
                    t0 = time.perf_counter()
                    for _ in range(8):
                        _, s = model.step(tok, s)
                    if r:  # the first round warms up
                        rates[name].append(8 * B / (time.perf_counter() - t0))
            print(f"batch {B:3d}: " + ", ".join(f"{n} {statistics.median(v):.1f} tok/s" for n, v in rates.items()))


if __name__ == "__main__":
    main()
