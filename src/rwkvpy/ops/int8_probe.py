"""Run by :func:`rwkvpy.ops.plan.probe_int8` in a subprocess, never imported by the library:
torch's int8 weight kernel can crash the process on some CPUs.

    python -m rwkvpy.ops.int8_probe 64x168,768x768
"""

import os
import sys

import torch

from .plan import _UNIT, PROBE_REPEATS, PROBE_ROWS, int8_packed, verified


def probe_shapes(shapes: list[tuple[int, int]]) -> None:
    """Run in a subprocess: for each (out, in), ``ok`` or ``wrong`` on stdout; a crash says the rest."""
    g = torch.Generator().manual_seed(0)
    for out, n_in in shapes:
        ok = True
        q = torch.randint(-127, 128, (out, n_in), dtype=torch.int8, generator=g)
        scale = (torch.rand(out, generator=g) + 0.5) / 127
        for rows in PROBE_ROWS:
            for _ in range(PROBE_REPEATS if rows == 1 else 3 if rows <= 64 else 1):
                x = torch.randn(rows, n_in, generator=g)
                good, _ = verified(int8_packed, x, q, scale.to(torch.bfloat16).float(), False, _UNIT["bfloat16"])
                ok = ok and good
        print(f"{'ok' if ok else 'wrong'} {out}x{n_in}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("RWKVPY_PROBE_THREADS", torch.get_num_threads())))
    probe_shapes([tuple(int(v) for v in s.split("x")) for s in sys.argv[1].split(",")])
