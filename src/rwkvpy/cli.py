"""The ``rwkvpy`` command. Subcommands are thin wrappers over library calls.

Errors a user can cause print one line (``rwkvpy: error: ...``) and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import FORMATS, read_checkpoint, write_checkpoint
from .errors import RwkvpyError
from .loading import load
from .models import RWKV4Config, build_model, random_state_dict


def probe_tokens(vocab_size: int, length: int = 32) -> torch.Tensor:
    """A fixed token sequence for comparing two models' logits."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, length), generator=g)


@torch.no_grad()
def compare_logits(a, b, tokens: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of two models on ``tokens``, parallel form."""
    la, _ = a(tokens)
    lb, _ = b(tokens)
    return (la - lb).abs().max().item(), la.abs().max().item()


def cmd_convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise RwkvpyError(f"{dst}: already exists (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise RwkvpyError(f"{dst}: destination is the source")
    cfg, sd, fmt = read_checkpoint(src)
    print(f"read {src} ({fmt}): {_describe(cfg, sd)}")
    write_checkpoint(cfg, sd, dst, args.to)
    cfg2, sd2, _ = read_checkpoint(dst)
    same = sum(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    print(f"wrote {dst} ({args.to}): {same}/{len(sd)} tensors bit-identical")
    tokens = probe_tokens(cfg.vocab_size)
    diff, scale = compare_logits(build_model(cfg, sd), build_model(cfg2, sd2), tokens)
    print(f"probe: max |logit difference| = {diff:.3g} over {tokens.shape[1]} tokens (fp32)")
    # Formats only rename tensors, so anything beyond fp32 rounding means a broken conversion.
    if cfg2 != cfg or not diff <= 1e-6 * max(1.0, scale):
        raise RwkvpyError(f"{dst}: conversion changed the model (max logit difference {diff:.3g})")
    return 0


def cmd_info(args) -> int:
    cfg, sd, fmt = read_checkpoint(args.model)
    print(f"{args.model}: {fmt}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:15s} {v}")
    print(f"  {'parameters':15s} {sum(t.numel() for t in sd.values()):,}")
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    print(f"  {'dtypes':15s} {', '.join(f'{d} ({n})' for d, n in dtypes.items())}")
    return 0


@torch.no_grad()
def cmd_demo(args) -> int:
    print("No trained default model is bundled yet: this demo uses a small RANDOM byte-level")
    print("RWKV-4 (4 layers, width 128), so its text is noise. It shows the machinery instead.\n")
    cfg = RWKV4Config(vocab_size=256, n_embd=128, n_layer=4)
    model = build_model(cfg, random_state_dict(cfg, seed=args.seed))
    prompt = torch.tensor([list("ROMEO:".encode())])

    t0 = time.perf_counter()
    logits, state = model(prompt)  # parallel form over the prompt
    rows, s = [], None
    for t in range(prompt.shape[1]):  # recurrent form, token by token
        row, s = model.step(prompt[:, t], s)
        rows.append(row)
    diff = (torch.stack(rows, 1) - logits).abs().max().item()
    print(f"parallel vs recurrent form on the prompt: max |logit difference| = {diff:.2g}")

    out = []
    token = logits[:, -1].argmax(-1)
    for _ in range(args.tokens):
        out.append(int(token))
        row, state = model.step(token, state)
        token = row.argmax(-1)
    dt = time.perf_counter() - t0
    text = bytes(out).decode("utf-8", errors="replace")
    print(f"greedy continuation of 'ROMEO:' ({args.tokens} bytes, {dt:.2f}s): {text!r}")

    with tempfile.TemporaryDirectory() as tmp:
        sd = model.state_dict()
        path = Path(tmp) / "model.pth"
        write_checkpoint(cfg, sd, path, "pth")
        for fmt in ("hf", "native"):
            dst = Path(tmp) / fmt
            write_checkpoint(cfg, read_checkpoint(path)[1], dst, fmt)
            path = dst
        back = load(path)
        diff, _ = compare_logits(model, back, prompt)
        print(f"pth -> hf -> native round trip: max |logit difference| = {diff:.2g}")
    return 0


def _describe(cfg: RWKV4Config, sd) -> str:
    n = sum(t.numel() for t in sd.values())
    return (f"RWKV-4, {cfg.n_layer} layers, n_embd {cfg.n_embd}, dim_att {cfg.dim_att}, "
            f"dim_ffn {cfg.dim_ffn}, vocab {cfg.vocab_size}, {n:,} parameters")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkvpy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint between formats and verify it")
    c.add_argument("src", help="official .pth, Hugging Face folder, or rwkvpy folder/.safetensors")
    c.add_argument("dst", help="output path (a folder for native and hf, a file for pth)")
    c.add_argument("--to", required=True, choices=FORMATS)
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="print a checkpoint's format, shapes and size")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="run the forms and formats on a small random model")
    d.add_argument("--tokens", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RwkvpyError as e:
        print(f"rwkvpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkvpy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
