"""CPU inference speed of rwkvpy vs the official ``rwkv`` package and ``transformers``, one run.

    python benchmarks/bench_cpu.py [--arch rwkv4|rwkv7] [--layers 12 --width 768 --vocab V] [--repeats 5]
                                   [--long-context 100000] [--compile] [--json results.json]

Random weights with the shape of RWKV-4-Pile-169M by default (``--arch rwkv7``: RWKV-7 G1 0.1B,
vocabulary 65,536, LoRA ranks 64/64/32/128; its official peer runs in a child process; ``--arch retnet``:
12 x 768 with heads of 64, no peer), written to a temporary
rwkvpy checkpoint, then ``rwkvpy.bench.run`` (the same code as ``rwkvpy bench --model M``):
decode tok/s at batch 1/16/64, prefill of a 1024-token prompt, peak RSS, the memory
bandwidth and the decode floor it implies, and the peers' figures, measured round-robin.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rwkvpy import bench
from rwkvpy.checkpoint import save_native
from rwkvpy.models import RetNetConfig, RWKV4Config, RWKV7Config, random_state_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("rwkv4", "rwkv7", "retnet"), default="rwkv4")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, help="default 50277 (rwkv4), 65536 (rwkv7)")
    ap.add_argument("--kinds", default="fp32,bf16,int8")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--long-context", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also decode through torch.compile (batch 1)")
    ap.add_argument("--json")
    args = ap.parse_args()

    if args.arch == "rwkv7":
        cfg = RWKV7Config(vocab_size=args.vocab or 65536, n_embd=args.width, n_layer=args.layers)
    elif args.arch == "retnet":  # heads of 64; no peers (no official implementation runs on a CPU)
        cfg = RetNetConfig(vocab_size=args.vocab or 50277, n_embd=args.width, n_layer=args.layers,
                           n_head=args.width // 64)
    else:
        cfg = RWKV4Config(vocab_size=args.vocab or 50277, n_embd=args.width, n_layer=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_native(cfg, random_state_dict(cfg, seed=0), path)
        print(f"model: {cfg}")
        result = bench.run(path, kinds=tuple(args.kinds.split(",")),
                           batches=tuple(int(b) for b in args.batches.split(",")), prompt=args.prompt,
                           decode_tokens=args.decode_tokens, repeats=args.repeats, peers=not args.no_peers,
                           long_context=args.long_context, compiled=args.compile)
    if args.json:
        bench.write_json(result, args.json)


if __name__ == "__main__":
    main()
