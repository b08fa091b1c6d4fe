"""CUDA path check and a speed reading on a GPU (run where one exists).

    python benchmarks/check_cuda.py

Checks, on random weights: parallel form = recurrent form on the GPU (fp32), GPU = CPU
logits, bf16 close to fp32, then times prefill and batch-1 decode for the 169M shape.
"""

from __future__ import annotations

import time

import torch

from rwkvpy.models import RWKV4Config, build_model, random_state_dict


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 as fp32
    cfg = RWKV4Config(vocab_size=1000, n_embd=96, n_layer=3, dim_ffn=300)
    sd = random_state_dict(cfg, seed=0)
    cpu = build_model(cfg, sd)
    gpu = build_model(cfg, sd, device="cuda")
    toks = torch.randint(0, cfg.vocab_size, (4, 200), generator=torch.Generator().manual_seed(0))
    ref, ref_state = cpu(toks)
    par, state = gpu(toks.cuda())
    rows, s = [], None
    for t in range(toks.shape[1]):
        row, s = gpu.step(toks[:, t].cuda(), s)
        rows.append(row)
    step = torch.stack(rows, 1)
    print(f"fp32 gpu parallel vs cpu: {rel(par.cpu(), ref):.2e}")
    print(f"fp32 gpu step vs gpu parallel: {rel(step, par):.2e}")
    print(f"fp32 gpu state (num) vs cpu: {rel(state.num.cpu(), ref_state.num):.2e}")
    bf = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    print(f"bf16 gpu parallel vs fp32 cpu: {rel(bf(toks.cuda())[0].float().cpu(), ref):.2e}")

    big = RWKV4Config(vocab_size=50277, n_embd=768, n_layer=12)
    sd = random_state_dict(big, seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(big, sd, dtype=dtype, device="cuda")
        prompt = torch.randint(0, big.vocab_size, (1, 1024), device="cuda")
        for L in (4, 16, 64):
            model.chunk_len = L
            model(prompt, last_only=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                model(prompt, last_only=True)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / 5
            print(f"{str(dtype):15s} prefill 1024 chunk_len={L:<3d} {1024 / dt:9.0f} tok/s")
        tok = prompt[:, 0]
        _, s = model(prompt[:, :8])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            _, s = model.step(tok, s)
        torch.cuda.synchronize()
        print(f"{str(dtype):15s} decode batch 1 {100 / (time.perf_counter() - t0):9.0f} tok/s")


if __name__ == "__main__":
    main()
