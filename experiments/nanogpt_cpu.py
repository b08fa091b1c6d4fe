"""RWKV-4, RWKV-7, RetNet and the GPT baseline on tinyshakespeare (byte level), equal parameters.

    python experiments/nanogpt_cpu.py --data ../shared/data/tinyshakespeare.txt [--out runs/nanogpt_cpu]
        [--setting nanogpt|6x256] [--precision fp32|bf16|auto] [--archs rwkv4,rwkv7,retnet,gpt] [--threads N]

nanoGPT's setting: 4 layers, width 128, context 64, batch 12, 2000 iterations, lr 1e-3 with
warm-up 100 and cosine decay to 1e-4, no dropout; nanoGPT reports 1.88 nats/char for its GPT.
RWKV-4's FFN is 3.5x wide (448) so that both have 12 * 128^2 weights per layer; RWKV-7 (two
heads of 64, the official LoRA ranks 32/32/32/64) has a 2.75x FFN (352); RetNet 4 heads and a
2x FFN: parameters within 1%. The larger setting ``6x256``: 6 layers, width 256, context 128,
batch 12, 1000 iterations, the same schedule (FFN: RWKV-4 896, RWKV-7 864). Writes each run's
log, a combined plot (against steps and against wall-clock), and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rwkvpy.train import TrainConfig, Trainer, plot_curves

COMMON = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=100, ckpt_interval=500, log_interval=20,
              eval_windows=480, seed=1337)
# nanoGPT's CPU setting, and a larger one (6 x 256, context 128: ~4.9M parameters, 6x nanoGPT's).
# The FFN widths give the four models equal parameter counts (within 1%); heads of 64 at width 256.
SETTINGS = {
    "nanogpt": dict(setting=dict(n_layer=4, n_embd=128, n_head=4, ctx_len=64, batch_size=12, max_iters=2000),
                    ffn={"rwkv4": 448, "rwkv7": 352}, title="nanoGPT CPU setting"),
    "6x256": dict(setting=dict(n_layer=6, n_embd=256, n_head=4, ctx_len=128, batch_size=12, max_iters=1000),
                  ffn={"rwkv4": 896, "rwkv7": 864}, title="6 x 256, context 128"),
}


def val_at(rows, seconds):
    """Validation loss reached by ``seconds`` of training (interpolated between evaluations)."""
    pts = [(float(r["elapsed_s"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    t, v = zip(*pts)
    return float(np.interp(seconds, t, v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/nanogpt_cpu")
    ap.add_argument("--plot", default="docs/img/nanogpt_cpu.png")
    ap.add_argument("--precision", default="fp32", help="fp32 (the recorded runs), bf16 or auto")
    ap.add_argument("--archs", default="rwkv4,rwkv7,retnet,gpt")
    ap.add_argument("--setting", choices=SETTINGS, default="nanogpt")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    results, logs = {}, {}
    for arch in args.archs.split(","):
        cfg = TrainConfig(data=args.data, out_dir=f"{args.out}/{arch}", arch=arch, precision=args.precision,
                          dim_ffn=setting["ffn"].get(arch), **setting["setting"], **COMMON)
        trainer = Trainer(cfg)
        r = trainer.fit()
        logs[arch] = trainer.read_log()
        tokens = cfg.max_iters * cfg.batch_size * cfg.ctx_len
        results[arch] = {"params": r["n_params"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
                         "train_seconds": r["train_seconds"], "tokens_per_s": tokens / r["train_seconds"]}
    budget = min(r["train_seconds"] for r in results.values())
    for arch, r in results.items():
        r["val_loss_at_equal_time"] = val_at(logs[arch], budget)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(logs, Path(args.plot), title=f"tinyshakespeare, {setting['title']} (loss vs step)")
    plot_curves(logs, Path(args.plot).with_name(Path(args.plot).stem + "_time.png"),
                title=f"tinyshakespeare, {setting['title']} (loss vs training seconds)", x="elapsed_s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"| arch | parameters | val loss (nats/char) | bits/byte | train s | tokens/s | val loss at {budget:.0f} s |")
    print("|---|---|---|---|---|---|---|")
    for arch, r in results.items():
        print(f"| {arch} | {r['params']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['train_seconds']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['val_loss_at_equal_time']:.4f} |")


if __name__ == "__main__":
    main()
