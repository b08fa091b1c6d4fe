"""``rwkvpy.load``: any supported checkpoint in, a ready model out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import describe_checkpoint, probe_tokens, read_checkpoint, read_pth, save_native
from .errors import RwkvpyError
from .io import atomic_write, read_safetensors
from .models import RWKV7, ModelBase, RWKV7State, build_model, load_state, projections
from .models.state import STATE_FORMAT
from .ops.allocator import keep_freed_memory
from .ops.linear import plan_projections
from .ops.plan import kernels_mode
from .ops.quant import check_loss_increase, is_quantized, logit_agreement, quantize_state_dict
from .tokenizers import find_tokenizer_file, tokenizer_for_model
from .train.evaluate import evaluate_file

DEFAULT_MODEL = Path(__file__).parent / "data" / "default"


def default_model_path() -> Path:
    """The small byte-level RWKV-4 trained on tinyshakespeare that ships with rwkvpy."""
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        raise RwkvpyError(f"{DEFAULT_MODEL}: the bundled default model is missing; pass --model")
    return DEFAULT_MODEL


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RwkvpyError(f"dtype {dtype} is not supported; use one of fp32, bf16, fp16, fp64")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise RwkvpyError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, fp64") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         dtype: torch.dtype | str = torch.float32, quantize: str | None = None,
         plan_report: list[str] | None = None) -> ModelBase:
    """Load an RWKV-4 or RWKV-7 model from an official ``.pth``, a Hugging Face folder or rwkvpy's
    format.

    The format is detected from the path; shapes come from the tensors, which are memory
    mapped, so loading in the checkpoint's own dtype copies nothing. ``dtype`` is how the
    matrices are stored (activations are fp32); ``quantize="int8"`` stores the projections
    as int8 with per-row scales. Raises ``CheckpointError`` (one line naming the file, key
    and shapes) on anything unusable.

    The model is ready for inference: eval mode, and no parameter requires grad, so calls
    build no autograd graph and take the fast no-grad kernels even outside ``torch.no_grad()``
    (``model.requires_grad_(True)`` to fine-tune).

    Projections get the kernels planned for this machine (:mod:`rwkvpy.ops.plan`: timed once,
    checked against float64, cached); ``RWKVPY_KERNELS=safe`` keeps plain ``F.linear``, and
    ``RWKVPY_KERNELS=lean`` leaves out the kernels that keep a second copy of a weight.
    ``plan_report`` (a list) receives the plan and the timings behind it, as text lines.
    """
    keep_freed_memory()  # page faults on every large temporary otherwise (ops/allocator.py)
    cfg, sd, _ = read_checkpoint(path)
    model = build_model(cfg, sd, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    model.requires_grad_(False)
    if kernels_mode() != "safe":
        plan_projections(model, report=plan_report)
    return model


def load_initial_state(path: str | os.PathLike, model):
    """A starting state for generation and chat: an rwkvpy state file (checked against the
    model), or a state-tuned RWKV-7 file (``blocks.{i}.att.time_state``, .pth or .safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        if meta.get("format") == STATE_FORMAT:
            return load_state(path, model)
    else:
        tensors = read_pth(path)
    if not any(k.endswith(".att.time_state") for k in tensors):
        raise RwkvpyError(f"{path}: neither an rwkvpy state file nor a state-tuned file (no att.time_state keys)")
    if not isinstance(model, RWKV7):
        raise RwkvpyError(f"{path}: a state-tuned RWKV-7 file; this model is {model.config.arch}")
    return RWKV7State.from_time_state(tensors, model, str(path))


def save(model, path: str | os.PathLike) -> None:
    """Write a model in rwkvpy's own format (a folder: safetensors with the official key names,
    and config.json), atomically; ``rwkvpy.load`` reads it back."""
    save_native(model.config, model.state_dict(), path)


def _mib(sd) -> float:
    return sum(t.numel() * t.element_size() for t in sd.values()) / 2**20


@torch.no_grad()
def quantize_checkpoint(src, dst, data=None, tokenizer: str | None = None, ctx_len: int = 128,
                        max_loss_increase: float | None = 1.0, log=print) -> dict:
    """Write an int8 copy of ``src`` (rwkvpy's format) at ``dst``, with its quality report:
    logits on a probe sequence (largest difference, KL, top-1 agreement) and, with ``data``,
    the validation loss before and after, refused (nothing written) when it rises more than
    ``max_loss_increase`` percent (None: never refused). The folder's tokenizer is copied; the
    written tensors are read back and compared."""
    src, dst = Path(src), Path(dst)
    cfg, sd, fmt = read_checkpoint(src)
    if is_quantized(sd):
        raise RwkvpyError(f"{src}: already quantized to int8")
    qsd = quantize_state_dict(sd, projections(cfg))
    log(f"read {src} ({fmt}): {describe_checkpoint(cfg, sd)}")
    log(f"int8 projections with one scale per output row: {_mib(sd):,.1f} MiB -> {_mib(qsd):,.1f} MiB")
    ref, quant = build_model(cfg, sd), build_model(cfg, qsd)
    tokens = probe_tokens(cfg.vocab_size, 64)
    report = logit_agreement(ref(tokens)[0][0], quant(tokens)[0][0])
    log(f"probe ({tokens.shape[1]} tokens): max |logit difference| {report['max_abs_diff']:.3g}, "
        f"mean KL(fp32 || int8) {report['kl']:.3g} nats, top-1 agreement {report['top1']:.1%}")
    if data:
        tok = None
        if cfg.vocab_size != 256 or tokenizer:
            tok = tokenizer_for_model(cfg.vocab_size, tokenizer, src)
        losses = [evaluate_file(m, data, tok, ctx_len=ctx_len)["loss"] for m in (ref, quant)]
        change = (losses[1] - losses[0]) / losses[0]
        report.update(loss_fp32=losses[0], loss_int8=losses[1], loss_change=change)
        log(f"validation loss on {data}: fp32 {losses[0]:.4f}, int8 {losses[1]:.4f} nats/token ({change:+.2%})")
        if max_loss_increase is not None:
            check_loss_increase(losses[0], losses[1], max_loss_increase)
    save_native(cfg, qsd, dst)
    tok_file = find_tokenizer_file(src) if src.is_dir() else None
    if tok_file is not None:
        atomic_write(dst / tok_file.name, lambda tmp: Path(tmp).write_bytes(tok_file.read_bytes()))
    _, back, _ = read_checkpoint(dst)
    if not all(torch.equal(back[k], qsd[k]) for k in qsd):
        raise RwkvpyError(f"{dst}: tensors read back differ from those written")
    log(f"wrote {dst} (rwkvpy format, int8){'; copied ' + tok_file.name if tok_file else ''}")
    return report
