"""Training speed on this machine: rwkvpy RWKV-4, RWKV-7 and RetNet vs the GPT baseline vs Hugging Face, same run.

    python benchmarks/bench_train.py [--steps 10] [--compile]

Three sizes, byte vocabulary: nanoGPT's CPU setting (4 x 128, context 64, batch 12), the
experiments' larger setting 6 x 256 (context 128, batch 12) and 6 x 512 (context 256, batch 8),
all models with the same parameters within 1%. One step = forward, backward and an AdamW update (fused, as
the trainer's) on a fixed random batch; the models take turns step by step. Prints tokens/s
(median step), the ratios, and the fraction of the matmul floor: 6 * parameters FLOPs per
token at the fp32 GEMM rate measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from rwkvpy.models import RetNetConfig, RWKV4Config, RWKV7Config, build_model, official_init
from rwkvpy.models.gpt import GPT, GPTConfig
from rwkvpy.ops.allocator import keep_freed_memory

# GPT heads: nanoGPT's CPU setting has 4 (as experiments/nanogpt_cpu.py); 6 x 512: heads of 64.
# RWKV-7's FFN width (ffn7) gives it the others' parameters within 1%, as in experiments/nanogpt_cpu.py
# (its default 4x FFN would add 18% / 10% / 9%).
SIZES = {"nanogpt-cpu": dict(n_layer=4, n_embd=128, n_head=4, ctx=64, batch=12, ffn7=352),
         "6x256": dict(n_layer=6, n_embd=256, n_head=4, ctx=128, batch=12, ffn7=864),  # experiments/nanogpt_cpu.py --setting 6x256
         "6x512": dict(n_layer=6, n_embd=512, n_head=8, ctx=256, batch=8, ffn7=1760)}
V = 256


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def training_step(model, forward, batch, ctx, bf16: bool = False):
    """One timed step (forward, backward, AdamW update) on a fixed random batch, as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (batch, ctx), generator=g)
    y = torch.randint(0, V, (batch, ctx), generator=g)

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as train --precision bf16
            logits = forward(model, x)
            loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def models(size: dict, compile_ours: bool):
    L, C, H, ctx = size["n_layer"], size["n_embd"], size["n_head"], size["ctx"]
    from transformers import GPT2Config, GPT2LMHeadModel, RwkvConfig, RwkvForCausalLM

    cfg = RWKV4Config(vocab_size=V, n_embd=C, n_layer=L, dim_ffn=int(3.5 * C))
    cfg7 = RWKV7Config(vocab_size=V, n_embd=C, n_layer=L, dim_ffn=size["ffn7"])  # heads of 64, the official LoRA ranks
    cfgr = RetNetConfig(vocab_size=V, n_embd=C, n_layer=L, n_head=H)  # FFN 2x: 12 C^2 per layer
    for label, model in (("rwkvpy RWKV-4", build_model(cfg, official_init(cfg)).train()),
                         ("rwkvpy RWKV-7", build_model(cfg7, official_init(cfg7)).train()),
                         ("rwkvpy RetNet", build_model(cfgr, official_init(cfgr)).train()),
                         ("rwkvpy GPT", GPT(GPTConfig(V, L, H, C, ctx)).train())):
        run = torch.compile(model) if compile_ours else model
        yield label, model, lambda m, x, run=run: run(x, return_state=False)[0]  # as the trainer
    hf = RwkvForCausalLM(RwkvConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L,
                                    intermediate_size=int(3.5 * C), context_length=ctx)).train()
    yield "HF RwkvForCausalLM", hf, lambda m, x: m(x, use_cache=False).logits
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=ctx, n_embd=C, n_layer=L, n_head=H,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).train()
    yield "HF GPT-2", gpt2, lambda m, x: m(x).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--compile", action="store_true", help="torch.compile rwkvpy's models (as train --compile)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: every model under autocast")
    args = ap.parse_args()
    keep_freed_memory()  # as `rwkvpy train` runs (RWKVPY_MALLOC=default: glibc as it is)
    gflops = gemm_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 GEMM {gflops:.0f} GFLOP/s, "
          f"{args.precision}{', rwkvpy models compiled' if args.compile else ''}")
    for name in args.sizes.split(","):
        size = SIZES[name]
        print(f"\n## {name}: {size}")
        peers = [(label, model, training_step(model, forward, size["batch"], size["ctx"], args.precision == "bf16"))
                 for label, model, forward in models(size, args.compile)]
        times = {label: [] for label, _, _ in peers}
        # Steps interleaved, model after model, so that drift in the machine's speed (large on a
        # shared VM) reaches every ratio alike; two warm-up steps each.
        for i in range(args.steps + 2):
            for label, _, step in peers:
                t = step()
                if i >= 2:
                    times[label].append(t)
        rates = {}
        for label, model, _ in peers:
            n = sum(p.numel() for p in model.parameters())
            rate = rates[label] = size["batch"] * size["ctx"] / statistics.median(times[label])
            floor = gflops * 1e9 / (6 * n)
            print(f"{label:22s} {n:>10,} params {rate:9.0f} tok/s  {rate / floor:6.1%} of matmul floor")
        for ours in ("rwkvpy RWKV-4", "rwkvpy RWKV-7", "rwkvpy RetNet"):
            for peer in ("rwkvpy GPT", "HF RwkvForCausalLM", "HF GPT-2"):
                print(f"{ours} / {peer}: x{rates[ours] / rates[peer]:.3f}")


if __name__ == "__main__":
    main()
