"""The trainer for causal language models (RWKV-4 and the GPT baseline), CPU or GPU, 1 or N
processes (``torchrun ... -m rwkvpy train``: DDP over gloo on CPU, nccl on GPU).

A step draws one global batch (``batch_size * grad_accum`` windows) from a seeded sampler;
with N processes each takes its own slice of every micro-batch, so N processes compute the
same update as one. Checkpoints hold the model, optimizer, step and sampler state and are
written atomically; ``resume`` continues to the same losses as a run never interrupted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..checkpoint import save_native
from ..errors import RwkvpyError
from ..io import atomic_write, atomic_write_text
from ..models import GPT, GPTConfig, RetNetConfig, RWKV4Config, RWKV7Config, build_model, official_init
from ..models.base import pin_inductor_vector_width
from ..ops.allocator import keep_freed_memory
from ..tokenizers import load_tokenizer
from .data import TokenData, WindowSampler, eval_starts, load_data, windows
from .evaluate import summed_loss

ARCHS = ("rwkv4", "rwkv7", "retnet", "gpt")
RECURRENT = ("rwkv4", "rwkv7", "retnet")  # built from a family's official_init
RWKV = ("rwkv4", "rwkv7")  # trained with the official L2Wrap
PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.15  # auto takes bf16 autocast only when the probe's step is this much faster
LOG_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb", "elapsed_s", "tokens_per_s"]
# What a resumed run takes from its command line: how it runs, not what it computes. Every other
# setting comes from the checkpoint, and one given otherwise is refused (it would be ignored).
RESUME_FROM_COMMAND_LINE = ("out_dir", "device", "compile")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out_dir: str = "runs/train"
    tokenizer: str | None = None  # None: bytes
    arch: str = "rwkv4"
    n_layer: int = 4
    n_embd: int = 128
    dim_ffn: int | None = None  # rwkv4, rwkv7; default 4 * n_embd
    n_head: int = 4  # gpt, retnet
    head_size: int = 64  # rwkv7
    ctx_len: int = 64
    batch_size: int = 12  # windows per micro-batch (all processes together)
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_windows: int = 240
    ckpt_interval: int = 250
    log_interval: int = 10
    val_fraction: float = 0.1
    precision: str = "auto"  # fp32, bf16 (autocast), or auto: bf16 only where a probe here finds it faster
    compile: bool = False  # torch.compile the model (slow start; faster or slower by size, see docs)
    seed: int = 1337
    device: str = "cpu"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise RwkvpyError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.arch not in ARCHS:
            raise RwkvpyError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("n_layer", "n_embd", "ctx_len", "batch_size", "grad_accum", "max_iters", "eval_windows",
                     "log_interval", "eval_interval", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise RwkvpyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arch in ("gpt", "retnet") and self.n_embd % self.n_head:
            raise RwkvpyError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.arch == "rwkv7" and self.n_embd % self.head_size:
            raise RwkvpyError(f"n_embd {self.n_embd} is not divisible by head_size {self.head_size}")


def choose_precision(fp32_seconds: float, bf16_seconds: float) -> str:
    """``bf16`` when a step under bf16 autocast is at least BF16_MIN_SPEEDUP x faster."""
    return "bf16" if fp32_seconds >= BF16_MIN_SPEEDUP * bf16_seconds else "fp32"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def build(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    if cfg.arch in RECURRENT:
        if cfg.arch == "rwkv4":
            mcfg = RWKV4Config(vocab_size=vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, dim_ffn=cfg.dim_ffn)
        elif cfg.arch == "retnet":
            mcfg = RetNetConfig(vocab_size=vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                ffn_dim=cfg.dim_ffn)
        else:
            mcfg = RWKV7Config(vocab_size=vocab_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                               head_size=cfg.head_size, dim_ffn=cfg.dim_ffn)
        model = build_model(mcfg, official_init(mcfg, seed=cfg.seed), device=cfg.device)
        return model.train()
    return GPT(GPTConfig(vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.ctx_len), seed=cfg.seed).to(cfg.device)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """RWKV-4 as officially: no decay on time_*, norms and the embedding; time_decay at 2x lr
    and time_first at 3x (RetNet likewise: decay on its matrices, not the embedding). RWKV-7 as officially: decay on the ``.weight`` matrices (embedding,
    projections, head; not the LoRA matrices), w0 at 2x lr. GPT as nanoGPT: decay on every matrix."""
    groups = {"decay": [], "no_decay": [], "x2": [], "x3": []}
    for name, p in model.named_parameters():
        if cfg.arch == "rwkv7":
            if name.endswith("att.w0"):
                groups["x2"].append(p)
            elif p.dim() >= 2 and name.endswith(".weight") and ".ln" not in name:
                groups["decay"].append(p)
            else:
                groups["no_decay"].append(p)
        elif name.endswith("time_decay"):
            groups["x2"].append(p)
        elif name.endswith("time_first"):
            groups["x3"].append(p)
        elif p.dim() >= 2 and (cfg.arch == "gpt" or name != "emb.weight"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    spec = {"decay": (cfg.weight_decay, 1.0), "no_decay": (0.0, 1.0), "x2": (0.0, 2.0), "x3": (0.0, 3.0)}
    return [{"params": ps, "weight_decay": spec[k][0], "lr_scale": spec[k][1]} for k, ps in groups.items() if ps]


class _L2Wrap(torch.autograd.Function):
    """The official RWKV loss wrapper: a tiny gradient pulling each position's top logit to 0.

    Scaled by the incoming gradient (1 in the official code), so that dividing the loss for
    gradient accumulation scales this term alike."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        top, ids = logits.max(-1, keepdim=True)
        g = torch.zeros_like(logits).scatter_(-1, ids, top * factor * grad)
        return grad, g


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, arch: str) -> torch.Tensor:
    logits, _ = model(x, return_state=False)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return _L2Wrap.apply(loss, logits) if arch in RWKV and torch.is_grad_enabled() else loss


def _refuse_changed_settings(cfg: TrainConfig, saved: dict, ckpt: Path) -> None:
    """A resumed run continues the saved one: a setting given on the command line (one that is
    not its default) that differs from the checkpoint's is an error, not silently dropped."""
    def same(name, a, b):
        if name in ("data", "tokenizer") and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    for f in fields(TrainConfig):
        given = getattr(cfg, f.name)
        if (f.name in RESUME_FROM_COMMAND_LINE or f.name not in saved or given == f.default
                or same(f.name, given, saved[f.name])):
            continue
        flag = "--" + f.name.replace("_", "-")
        raise RwkvpyError(f"{flag} {given} differs from the checkpoint's {saved[f.name]} ({ckpt}): a resumed run "
                          f"keeps its settings; drop {flag}, or start a new run")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        keep_freed_memory()  # a training step's temporaries would each fault their pages in again
        self.rank, self.world = _init_distributed(cfg.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.pt"
        state = None
        if resume:
            if not self.ckpt_path.is_file():
                raise RwkvpyError(f"{self.ckpt_path}: no checkpoint to resume from")
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            saved = dict(state["config"])
            if "bf16" in saved:  # checkpoints before --precision
                saved["precision"] = "bf16" if saved.pop("bf16") else "fp32"
            _refuse_changed_settings(cfg, saved, self.ckpt_path)
            cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in RESUME_FROM_COMMAND_LINE}})
        if cfg.batch_size % self.world:
            raise RwkvpyError(f"batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.cfg = cfg
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        self.data: TokenData = load_data(cfg.data, tokenizer, cfg.val_fraction, cfg.ctx_len)
        torch.manual_seed(cfg.seed)
        self.model = build(cfg, self.data.vocab_size)
        # The fused update: one kernel per group instead of ~10 ops per tensor (RWKV-4 has many).
        fused = next(self.model.parameters()).device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
        self.sampler = WindowSampler(self.data.train, cfg.ctx_len, seed=cfg.seed)
        self.step = 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.generator.set_state(state["sampler"])
            self.step = state["step"]
        if cfg.precision == "auto":  # decided once; checkpoints record the decision, so resume is exact
            cfg = replace(cfg, precision=self._probe_precision())
            self.cfg = cfg
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.model)
        if cfg.compile:
            pin_inductor_vector_width()
            self.ddp = torch.compile(self.ddp)
        self.elapsed = state["elapsed_s"] if state else 0.0
        self.val_x, self.val_y = windows(self.data.val, eval_starts(len(self.data.val), cfg.ctx_len,
                                                                   cfg.eval_windows), cfg.ctx_len)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _autocast(self, precision: str | None = None):
        return torch.autocast(device_type=torch.device(self.cfg.device).type, dtype=torch.bfloat16,
                              enabled=(precision or self.cfg.precision) == "bf16")

    def _probe_precision(self, repeats: int = 3) -> str:
        """``bf16`` where a forward and backward of this model on a window or two runs at least
        BF16_MIN_SPEEDUP x faster under bf16 autocast than in fp32 on this machine, else ``fp32``.
        CPUs without bf16 arithmetic run it many times slower (docs/benchmarks.md), so a first
        bf16 step slower than twice the fp32 one ends the probe. Gradients are discarded and
        the sampler is not touched, so training is as if no probe ran. With several processes
        rank 0 decides for all."""
        cfg = self.cfg
        rows = min(2, max(1, cfg.batch_size // self.world))
        g = torch.Generator().manual_seed(0)
        x, y = windows(self.data.train, torch.randint(0, len(self.data.train) - cfg.ctx_len - 1, (rows,),
                                                     generator=g).tolist(), cfg.ctx_len)
        x, y = x.to(cfg.device), y.to(cfg.device)

        def seconds(precision: str) -> float:
            t0 = time.perf_counter()
            with self._autocast(precision):
                lm_loss(self.model, x, y, cfg.arch).backward()
            return time.perf_counter() - t0

        times = {}
        for precision in ("fp32", "bf16"):
            first = seconds(precision)  # warm-up
            if precision == "bf16" and first > 2 * times["fp32"]:
                times["bf16"] = first
                break
            times[precision] = statistics.median(seconds(precision) for _ in range(repeats))
        self.optimizer.zero_grad(set_to_none=True)
        choice = torch.tensor([1.0 if choose_precision(times["fp32"], times["bf16"]) == "bf16" else 0.0])
        if self.world > 1:
            torch.distributed.broadcast(choice, src=0)
        precision = "bf16" if choice.item() else "fp32"
        self.precision_probe = {"fp32_s": times["fp32"], "bf16_s": times["bf16"], "chosen": precision}
        if self.rank == 0:
            print(f"precision auto: a step took {times['fp32'] * 1e3:.0f} ms in fp32, {times['bf16'] * 1e3:.0f} ms "
                  f"under bf16 autocast: training in {precision}", file=sys.stderr)
        return precision

    def train_step(self) -> float:
        cfg, rows = self.cfg, self.cfg.batch_size // self.world
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, cfg) * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.batch(cfg.batch_size)  # the global micro-batch, same on every rank
            x = x[self.rank * rows : (self.rank + 1) * rows].to(cfg.device)
            y = y[self.rank * rows : (self.rank + 1) * rows].to(cfg.device)
            sync = self.world == 1 or micro == cfg.grad_accum - 1
            ctx = self.ddp.no_sync() if not sync else nullcontext()
            with ctx, self._autocast():
                loss = lm_loss(self.ddp, x, y, cfg.arch) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.world > 1:  # the mean over ranks, for logging
            t = torch.tensor([total], device=cfg.device)
            torch.distributed.all_reduce(t)
            total = t.item() / self.world
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss (nats per token) over the fixed validation windows."""
        self.model.eval()
        with self._autocast():
            total = summed_loss(self.model, self.val_x, self.val_y, self.cfg.batch_size)
        self.model.train()
        return total / self.val_y.numel()

    def bits_per_byte(self, loss: float) -> float:
        return loss / math.log(2) / self.data.bytes_per_val_token

    def fit(self, progress: bool = True) -> dict:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.ctx_len
        bar = tqdm(total=cfg.max_iters, initial=self.step, disable=not progress or self.rank != 0,
                   desc=f"train {cfg.arch}", dynamic_ncols=True)
        if cfg.compile and progress and self.rank == 0 and self.step < cfg.max_iters:
            bar.write("compiling the model (--compile): the first step takes a minute or two on a small CPU",
                      file=sys.stderr)
        result = {}
        window_loss, window_t, window_steps = 0.0, time.perf_counter(), 0
        while self.step < cfg.max_iters:
            t0 = time.perf_counter()
            loss = self.train_step()
            self.elapsed += time.perf_counter() - t0
            window_loss += loss
            window_steps += 1
            row = None
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                rate = tokens_per_step * window_steps / (time.perf_counter() - window_t)
                row = {"step": self.step, "tokens": self.step * tokens_per_step, "lr": lr_at(self.step - 1, cfg),
                       "train_loss": window_loss / window_steps, "elapsed_s": round(self.elapsed, 3),
                       "tokens_per_s": round(rate, 1)}
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{rate:.0f}")
                window_loss, window_t, window_steps = 0.0, time.perf_counter(), 0
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                val = self.evaluate() if self.rank == 0 else float("nan")
                row = row or {"step": self.step, "tokens": self.step * tokens_per_step,
                              "elapsed_s": round(self.elapsed, 3)}
                row.update(val_loss=round(val, 6), val_bpb=round(self.bits_per_byte(val), 6))
                result = {"step": self.step, "val_loss": val, "val_bpb": self.bits_per_byte(val)}
                bar.write(f"step {self.step}: val loss {val:.4f} nats/token, {row['val_bpb']:.4f} bits/byte")
            if row and self.rank == 0:
                self._log(row)
                if "val_loss" in row:
                    self.plot()  # the curves so far, for watching a long run
            if self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_iters:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if self.rank == 0:  # the trained model, which rwkvpy.load reads back (every arch)
            save_native(self.model.config, self.model.state_dict(), self.out / "model")
        result.update(n_params=self.n_params, train_seconds=self.elapsed)
        if self.world > 1:
            torch.distributed.barrier()  # rank 0 may still be writing
            torch.distributed.destroy_process_group()
        return result

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {"config": asdict(self.cfg), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.generator.get_state(),
                 "step": self.step, "elapsed_s": self.elapsed}
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))

    # --- the CSV log and the plot -------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.out / "log.csv"

    def read_log(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        with open(self.log_path, newline="") as f:
            return list(csv.DictReader(f))

    def _truncate_log(self) -> None:
        """Rows written after the checkpoint being resumed from would be written again."""
        rows = [r for r in self.read_log() if int(r["step"]) <= self.step]
        self._write_log(rows)

    def _write_log(self, rows: list[dict]) -> None:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.log_path, write)

    def _log(self, row: dict) -> None:
        with open(self.log_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow({k: row.get(k, "") for k in LOG_FIELDS})

    def plot(self) -> None:
        plot_curves({self.cfg.arch: self.read_log()}, self.out / "curves.png",
                    title=f"{self.cfg.arch}, {self.n_params:,} parameters")
        atomic_write_text(self.out / "config.json", _json(asdict(self.cfg)))


def plot_curves(runs: dict[str, list[dict]], path: Path, title: str = "", x: str = "step") -> None:
    """Train and validation loss of one or more runs against ``x`` (step or elapsed_s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        train = [(float(r[x]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
        val = [(float(r[x]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
        if train:
            line, = ax.plot(*zip(*train), alpha=0.5, label=f"{name} train")
            color = line.get_color()
        else:
            color = None
        if val:
            ax.plot(*zip(*val), "o-", color=color, label=f"{name} val")
    ax.set_xlabel("wall-clock seconds" if x == "elapsed_s" else x)
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _json(d) -> str:
    return json.dumps(d, indent=2) + "\n"


def _init_distributed(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()

