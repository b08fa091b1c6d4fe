"""Which matrix-product kernel reads weights fastest on this CPU, per storage and row count.

    python benchmarks/bench_kernels.py [--rows 1,2,4,16,64] [--repeats 10]

The matrices of one RWKV-4-Pile-169M (12 layers x width 768, FFN 3072, plus the 50277-row
head): ~494 MB in fp32, far beyond the caches, so every call reads its weight from memory.
Prints GB/s of weight read (bytes of the stored weight / time) for each candidate; the
kernel planner (``src/rwkvpy/ops/plan.py``) makes these choices per machine at load time;
this script shows the whole table at once (``rwkvpy info MODEL --plan`` shows the plan).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rwkvpy.bench import median_time
from rwkvpy.ops.plan import split_rows as _split_rows_product
from rwkvpy.ops.quant import quantize_int8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,16,64")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    C, F_, L, V = 768, 3072, 12, 50277
    shapes = [(F_, C)] * (2 * L) + [(C, C)] * (4 * L) + [(V, C)]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*s, generator=g) / s[1] ** 0.5 for s in shapes]
    n = sum(w.numel() for w in ws)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; {n * 4 / 1e6:.0f} MB of fp32 weights")

    def report(name, fn, nbytes):
        t = median_time(fn, args.repeats)
        print(f"  {name:44s} {nbytes / t / 1e9:6.1f} GB/s")

    with torch.no_grad():
        for rows in (int(r) for r in args.rows.split(",")):
            print(f"rows = {rows}")
            xs = [torch.randn(rows, w.shape[1], generator=g) for w in ws]
            report("fp32 F.linear, W (out, in)", lambda: [F.linear(x, w) for x, w in zip(xs, ws)], n * 4)
            wt = [w.t().contiguous() for w in ws]
            report("fp32 x @ W, W (in, out)", lambda: [x @ w for x, w in zip(xs, wt)], n * 4)
            del wt
            report("fp32 split rows, bmm (rwkvpy)", lambda: [_split_rows_product(x, w) for x, w in zip(xs, ws)],
                   n * 4)
            for dtype in (torch.bfloat16, torch.float16):
                wh = [w.to(dtype) for w in ws]
                xh = [x.to(dtype) for x in xs]
                report(f"{dtype} F.linear, half x", lambda: [F.linear(x, w) for x, w in zip(xh, wh)], n * 2)
                report(f"{dtype} F.linear after widening W to fp32",
                       lambda: [F.linear(x, w.float()) for x, w in zip(xs, wh)], n * 2)
                if rows == 1:
                    wht = [w.t().contiguous() for w in wh]
                    report(f"{dtype} x @ W, W (in, out)", lambda: [x @ w for x, w in zip(xh, wht)], n * 2)
                    del wht
                del wh, xh
            if hasattr(torch, "_weight_int8pack_mm"):
                qs = [quantize_int8(w) for w in ws]
                xb = [x.bfloat16() for x in xs]
                sb = [s.bfloat16() for _, s in qs]
                report("int8 _weight_int8pack_mm, bf16 x",
                       lambda: [torch._weight_int8pack_mm(x, q, s) for x, (q, _), s in zip(xb, qs, sb)], n)
                if rows == 1:
                    report("int8 _weight_int8pack_mm, fp32 x",
                           lambda: [torch._weight_int8pack_mm(x, q, s) for x, (q, s) in zip(xs, qs)], n)
                report("int8 widened to fp32, F.linear, * scale",
                       lambda: [F.linear(x, q.float()) * s for x, (q, s) in zip(xs, qs)], n)
                del qs


if __name__ == "__main__":
    main()
