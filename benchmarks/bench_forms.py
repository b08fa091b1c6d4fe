"""Prefill and decode speed of rwkvpy's forms against the official ``rwkv`` package, same run.

    python benchmarks/bench_forms.py [--layers 12 --width 768 --vocab 50277 --prompt 1024]

Random weights with the shape of RWKV-4-Pile-169M by default. Prints medians of several
repeats and ratios against the official package (cpu fp32, JIT off) measured in this run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

import rwkvpy  # noqa: E402
from rwkvpy.bench import median_time  # noqa: E402
from rwkvpy.checkpoint import write_pth  # noqa: E402
from rwkvpy.models import RWKV4Config, random_state_dict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32, help="tokens per decode measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", default="8,16,32,64")
    ap.add_argument("--no-official", action="store_true")
    args = ap.parse_args()

    cfg = RWKV4Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {cfg}")
    tokens = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.pth"
        write_pth(random_state_dict(cfg, seed=0), path)
        model = rwkvpy.load(path)

        for L in (int(c) for c in args.chunks.split(",")):
            model.chunk_len = L
            t = median_time(lambda: model(tokens, last_only=True), args.repeats)
            results[f"rwkvpy prefill chunk_len={L}"] = args.prompt / t

        def decode():
            state = model(tokens[:, :8], last_only=True)[1]
            tok = tokens[:, 0]
            for _ in range(args.decode):
                _, state = model.step(tok, state)

        t = median_time(decode, args.repeats)
        results["rwkvpy decode batch 1"] = args.decode / t

        if not args.no_official:
            from rwkv.model import RWKV

            official = RWKV(str(path), "cpu fp32", verbose=False)
            ids = tokens[0].tolist()
            t = median_time(lambda: official.forward(ids, None), args.repeats)
            results["official prefill"] = args.prompt / t

            def official_decode():
                _, state = official.forward(ids[:8], None)
                for _ in range(args.decode):
                    _, state = official.forward([ids[0]], state)

            t = median_time(official_decode, args.repeats)
            results["official decode batch 1"] = args.decode / t

    for name, rate in results.items():
        peer = None
        if not args.no_official:
            peer = results["official prefill" if "prefill" in name else "official decode batch 1"]
        ratio = f"  x{rate / peer:.2f} vs official" if peer and not name.startswith("official") else ""
        print(f"{name:32s} {rate:9.1f} tok/s{ratio}")


if __name__ == "__main__":
    main()
