"""Cost of one generated token against context length: GPT with a KV cache, GPT recomputing
from the ids (attention as an RNN), RWKV-4 and RetNet, one plot (log scales).

    python experiments/inference_cost.py [--contexts 1024,4096,16384,65536] [--layers 6 --width 256]
                                         [--plot docs/img/inference_cost.png]

Random weights of one shape for all (6 x 256, byte vocabulary; the GPT with as many learned
positions as the longest context). For each context length the model reads a random prompt of
that length (in chunks of 1024), then decodes 8 tokens; reported: median milliseconds per
generated token and the bytes of state it holds (the KV cache grows with the context; the
recurrent states do not). The recomputing decoder's time grows like t^L: it runs only for short
contexts (``--recompute-contexts``), stopping after the first token that takes longer than
``--recompute-budget`` seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rwkvpy.models import RetNetConfig, RWKV4Config, build_model, random_state_dict
from rwkvpy.models.gpt import GPT, GPTConfig, RecomputeDecoder


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for name, t in state.tensors().items() if name != "pos")


@torch.no_grad()
def measure(model, context: int, g: torch.Generator, decode: int = 8) -> dict:
    state = None
    V = model.config.vocab_size
    for start in range(0, context, 1024):
        n = min(1024, context - start)
        _, state = model(torch.randint(0, V, (1, n), generator=g), state, last_only=True)
    times = []
    for _ in range(decode):
        t0 = time.perf_counter()
        _, state = model.step(torch.randint(0, V, (1,), generator=g), state)
        times.append(time.perf_counter() - t0)
    return {"ms_per_token": 1000 * statistics.median(times), "state_bytes": state_bytes(state)}


@torch.no_grad()
def measure_recompute(model: GPT, context: int, g: torch.Generator) -> dict:
    dec = RecomputeDecoder(model)
    dec.ids = torch.randint(0, model.config.vocab_size, (context,), generator=g).tolist()
    t0 = time.perf_counter()
    dec.step(1)
    return {"ms_per_token": 1000 * (time.perf_counter() - t0), "state_bytes": 8 * len(dec.ids),
            "layer_evaluations": dec.evaluations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--recompute-contexts", default="2,4,8,16,32")
    ap.add_argument("--recompute-budget", type=float, default=30.0,
                    help="seconds: no longer context is tried once one token took longer")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--plot", default="docs/img/inference_cost.png")
    ap.add_argument("--json")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    L, C = args.layers, args.width
    g = torch.Generator().manual_seed(0)
    rwkv4 = RWKV4Config(vocab_size=256, n_embd=C, n_layer=L)
    retnet = RetNetConfig(vocab_size=256, n_embd=C, n_layer=L, n_head=C // 64)
    gpt = GPT(GPTConfig(vocab_size=256, n_layer=L, n_head=C // 64, n_embd=C, block_size=max(contexts) + 16)).eval()
    gpt.requires_grad_(False)
    models = {"RWKV-4": build_model(rwkv4, random_state_dict(rwkv4)).requires_grad_(False),
              "RetNet": build_model(retnet, random_state_dict(retnet)).requires_grad_(False),
              "GPT, KV cache": gpt}
    results: dict[str, list[dict]] = {name: [] for name in [*models, "GPT, recompute"]}
    for context in contexts:
        for name, model in models.items():
            r = {"context": context, **measure(model, context, g)}
            results[name].append(r)
            print(f"{name:16s} context {context:>6,}: {r['ms_per_token']:9.2f} ms/token, "
                  f"state {r['state_bytes'] / 2**20:9.2f} MiB", flush=True)
    for context in (int(c) for c in args.recompute_contexts.split(",")):
        r = {"context": context, **measure_recompute(gpt, context, g)}
        results["GPT, recompute"].append(r)
        print(f"{'GPT, recompute':16s} context {context:>6,}: {r['ms_per_token']:9.2f} ms/token, "
              f"{r['layer_evaluations']:,} layer evaluations", flush=True)
        if r["ms_per_token"] > 1000 * args.recompute_budget:
            break

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        xs = [r["context"] for r in rows]
        a.plot(xs, [r["ms_per_token"] for r in rows], marker="o", label=name)
        b.plot(xs, [max(r["state_bytes"], 1) / 2**20 for r in rows], marker="o", label=name)
    for ax, title in ((a, "time per generated token (ms)"), (b, "state held (MiB; recompute: the ids)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    a.legend()
    fig.suptitle(f"Inference cost against context, {L} x {C}, CPU")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
