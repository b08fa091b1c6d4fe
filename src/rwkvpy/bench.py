"""``rwkvpy bench``: decode and prefill speed, memory and the memory-bandwidth floor of a
model on this machine, next to the official ``rwkv`` package and ``transformers`` on the
same weights, all measured in one run.

Decoding one token reads every projection once, so its floor is
``bytes of projections / memory bandwidth``; the bandwidth is that of a large read-only
reduction measured here. Every measurement is repeated round-robin (one of each, then the
next round) and the median kept, so a slow spell of a shared machine hits every entry
alike. Peers are measured only when their packages are installed (they are test
dependencies of rwkvpy, never runtime ones).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .ops.plan import cpu_flags, cpu_info

KINDS = {"fp32": {}, "bf16": {"dtype": "bf16"}, "fp16": {"dtype": "fp16"}, "int8": {"quantize": "int8"}}
OFFICIAL_STRATEGY = {"fp32": "cpu fp32", "bf16": "cpu bf16", "int8": "cpu fp32i8"}
HF_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Task:
    name: str
    fn: object  # () -> None
    tokens: int  # tokens processed per call
    repeats: int
    times: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / statistics.median(self.times)


def machine() -> dict:
    return {"cpu": cpu_info()[0], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "flags": cpu_flags(),
            "torch": torch.__version__, "python": platform.python_version()}


def median_time(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of summing a large fp32 tensor (read once, nothing written)."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / median_time(x.sum, repeats)


def bytes_per_token(model) -> int:
    """Bytes a decode step reads: every matrix but the embedding (one row of it), every vector."""
    total = 0
    for name, t in model.state_dict().items():
        total += t[0].numel() * t.element_size() if name == "emb.weight" else t.numel() * t.element_size()
    return total


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _decode_fn(step, state, tokens):
    @torch.no_grad()  # as the peers decode (rwkv and transformers are timed under no_grad)
    def run():
        s = state
        for t in tokens:
            _, s = step(t, s)
    return run


def rwkvpy_tasks(path, kind: str, batches, prompt, decode_tokens, repeats, g,
                 compiled: bool = False) -> tuple[list[Task], int]:
    from .loading import load

    model = load(path, **KINDS[kind])
    V = model.config.vocab_size
    tasks = []
    with torch.no_grad():
        for B in batches:
            _, state = model(torch.randint(0, V, (B, 8), generator=g))
            toks = [torch.randint(0, V, (B,), generator=g) for _ in range(decode_tokens)]
            tasks.append(Task(f"rwkvpy {kind} decode batch {B}", _decode_fn(model.step, state, toks),
                              B * decode_tokens, repeats))
        ids = torch.randint(0, V, (1, prompt), generator=g)
        tasks.append(Task(f"rwkvpy {kind} prefill {prompt}", torch.no_grad()(lambda: model(ids, last_only=True)),
                          prompt, repeats))
        if compiled:  # after the eager tasks took the eager step
            _, state = model(torch.randint(0, V, (1, 8), generator=g))
            toks = [torch.randint(0, V, (1,), generator=g) for _ in range(decode_tokens)]
            model.compile_step()
            tasks.append(Task(f"rwkvpy {kind} compiled decode batch 1", _decode_fn(model.step, state, toks),
                              decode_tokens, repeats))
    return tasks, bytes_per_token(model)


def official_tasks(pth: Path, kind: str, vocab: int, prompt, decode_tokens, repeats, g) -> list[Task]:
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV

    model = RWKV(str(pth), OFFICIAL_STRATEGY[kind], verbose=False)
    ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
    _, state = model.forward(ids[:8], None)

    def decode():
        s = [t.clone() for t in state]  # the official forward updates the state in place
        for t in ids[8: 8 + decode_tokens]:
            _, s = model.forward([t], s)

    name = f"official {OFFICIAL_STRATEGY[kind]}"
    tasks = [Task(f"{name} decode batch 1", decode, decode_tokens, repeats)]
    if kind == "fp32" or kind == "int8":  # its bf16 prefill runs at ~1 GFLOP/s on AVX2: skipped
        tasks.append(Task(f"{name} prefill {prompt}", lambda: model.forward(ids, None), prompt,
                          repeats if kind == "fp32" else 1))
    return tasks


_REPLY = "rwkvpy-bench:"  # marks the child's protocol lines among whatever the package prints


class OfficialRwkv7:
    """The official package's RWKV-7 in a child process (``RWKV_V7_ON=1`` swaps its class for
    the whole process), which times one call per request: its measurements take their turns in
    the round-robin like every other task, instead of after them."""

    def __init__(self, pth: Path, strategy: str, vocab: int, prompt: int, decode_tokens: int):
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
        self.proc = subprocess.Popen([sys.executable, "-m", "rwkvpy.bench", "official-rwkv7", str(pth), strategy,
                                      str(vocab), str(prompt), str(decode_tokens)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._reply()  # loaded

    def _reply(self) -> str:
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return line[len(_REPLY):].strip()
        raise RuntimeError(f"the official package's child process ended (exit code {self.proc.wait()})")

    def timed(self, what: str) -> float:
        """Seconds one ``decode`` or ``prefill`` call took, timed in the child."""
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def official_rwkv7_tasks(child: OfficialRwkv7, strategy: str, prompt: int, decode_tokens: int,
                         repeats: int) -> list[Task]:
    name = f"official {strategy}"
    tasks = [Task(f"{name} decode batch 1", lambda: child.timed("decode"), decode_tokens, repeats)]
    if strategy == "cpu fp32":
        tasks.append(Task(f"{name} prefill {prompt}", lambda: child.timed("prefill"), prompt, repeats))
    return tasks


@torch.no_grad()
def _child_official_rwkv7(pth: str, strategy: str, vocab: str, prompt: str, decode_tokens: str) -> None:
    """Serve :class:`OfficialRwkv7`: load, say so, then time one call per line read."""
    from rwkv.model import RWKV

    model = RWKV(pth.removesuffix(".pth"), strategy)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(vocab), (int(prompt),), generator=g).tolist()
    _, state = model.forward(ids[:8], None)
    n = int(decode_tokens)

    def decode():
        s = [t.clone() for t in state]  # its forward updates the state in place
        for t in ids[8: 8 + n]:
            _, s = model.forward([t], s)

    calls = {"decode": decode, "prefill": lambda: model.forward(ids, None)}
    print(_REPLY, "ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        calls[line.strip()]()
        print(_REPLY, time.perf_counter() - t0, flush=True)


def hf_tasks(folder: Path, kind: str, vocab: int, prompt, decode_tokens, repeats, g) -> list[Task]:
    from transformers import RwkvForCausalLM

    model = RwkvForCausalLM.from_pretrained(folder, rescale_every=0, dtype=HF_DTYPE[kind]).eval()
    ids = torch.randint(0, vocab, (1, prompt), generator=g)
    with torch.no_grad():
        state = model(ids[:, :8], use_cache=True).state

    def decode():
        s = [t.clone() for t in state]  # transformers updates the state in place
        with torch.no_grad():
            for t in range(decode_tokens):
                s = model(ids[:, 8 + t: 9 + t], state=s, use_cache=True).state

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    tasks = [Task(f"transformers {kind} decode batch 1", decode, decode_tokens, repeats)]
    if kind == "fp32":
        tasks.append(Task(f"transformers fp32 prefill {prompt}", prefill, prompt, repeats))
    return tasks


def peak_rss(path, kind: str, decode_tokens: int = 32) -> int:
    """Peak resident memory (bytes) of a fresh process that loads the model and decodes."""
    return int(_fresh_process("peak-rss", path, kind, decode_tokens)[-1])


def long_context_rss(path, kind: str, total: int, near: int = 1000) -> tuple[int, int]:
    """RSS (bytes) of a fresh process decoding after ``near`` and after ``total`` tokens of
    context (prefilled in chunks of 1024), so nothing else measured here is counted."""
    first, second = (int(x) for x in _fresh_process("long-context-rss", path, kind, near, total)[-2:])
    return first, second


def _vm_hwm() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking parent.
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


@torch.no_grad()
def _child_peak_rss(path: str, kind: str, decode_tokens: str) -> None:
    from .loading import load

    model, state = load(path, **KINDS[kind]), None
    for _ in range(int(decode_tokens)):
        _, state = model.step(torch.tensor([1]), state)
    print(_vm_hwm())


@torch.no_grad()
def _child_long_context_rss(path: str, kind: str, *targets: str) -> None:
    from .loading import load

    model = load(path, **KINDS[kind])
    g = torch.Generator().manual_seed(0)
    V, state, done = model.config.vocab_size, None, 0
    for target in map(int, targets):
        while done < target:
            n = min(1024, target - done)
            _, state = model(torch.randint(0, V, (1, n), generator=g), state, last_only=True)
            done += n
        for _ in range(16):
            _, state = model.step(torch.randint(0, V, (1,), generator=g), state)
        print(current_rss(), flush=True)


_CHILDREN = {"peak-rss": _child_peak_rss, "long-context-rss": _child_long_context_rss,
             "official-rwkv7": _child_official_rwkv7}


def _fresh_process(child: str, *args) -> list[str]:
    """Run one of ``_CHILDREN`` in a new Python process; the words it printed."""
    out = subprocess.run([sys.executable, "-m", "rwkvpy.bench", child, *map(str, args)], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def run(path, kinds=("fp32", "bf16", "int8"), batches=(1, 16, 64), prompt: int = 1024,
        decode_tokens: int = 16, repeats: int = 5, peers: bool = True, long_context: int = 0,
        compiled: bool = False, log=print) -> dict:
    """Measure everything; return the results (also printed through ``log``)."""
    from .checkpoint import read_checkpoint, write_checkpoint

    info = machine()
    log(f"machine: {info}")
    bandwidth = memory_bandwidth()
    log(f"memory bandwidth (sum of 1 GiB fp32): {bandwidth / 1e9:.1f} GB/s")
    g = torch.Generator().manual_seed(0)
    tasks, per_token = [], {}
    for kind in kinds:
        t, per_token[kind] = rwkvpy_tasks(path, kind, batches, prompt, decode_tokens, repeats, g, compiled)
        tasks += t
    children: list[OfficialRwkv7] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg, sd, _ = read_checkpoint(path)
        if peers and cfg.arch == "rwkv7":
            try:
                import rwkv  # noqa: F401

                write_checkpoint(cfg, sd, Path(tmp) / "model.pth", "pth")
                for kind in kinds:
                    if kind in ("fp32", "bf16"):  # its RWKV-7 runs fp32, bf16 and fp16 only
                        log(f"official rwkv package, RWKV-7, {kind}: in a child process, timed in turn")
                        strategy = OFFICIAL_STRATEGY[kind]
                        children.append(OfficialRwkv7(Path(tmp) / "model.pth", strategy, cfg.vocab_size, prompt,
                                                      decode_tokens))
                        tasks += official_rwkv7_tasks(children[-1], strategy, prompt, decode_tokens, repeats)
            except ImportError:
                log("official rwkv package not installed: skipped")
        elif peers and cfg.arch == "rwkv4":
            try:
                import rwkv  # noqa: F401

                write_checkpoint(cfg, sd, Path(tmp) / "model.pth", "pth")
                for kind in kinds:
                    if kind in OFFICIAL_STRATEGY:
                        tasks += official_tasks(Path(tmp) / "model.pth", kind, cfg.vocab_size, prompt,
                                                decode_tokens, repeats, g)
            except ImportError:
                log("official rwkv package not installed: skipped")
            try:
                import transformers  # noqa: F401

                write_checkpoint(cfg, sd, Path(tmp) / "hf", "hf")
                for kind in kinds:
                    if kind in HF_DTYPE:
                        tasks += hf_tasks(Path(tmp) / "hf", kind, cfg.vocab_size, prompt, decode_tokens,
                                          repeats, g)
            except ImportError:
                log("transformers not installed: skipped")
        del sd
        try:
            for task in tasks:
                task.fn()  # warm-up
            rounds = max(t.repeats for t in tasks)
            for r in tqdm(range(rounds), desc="rounds", leave=False):
                for task in tasks:
                    if r < task.repeats:
                        t0 = time.perf_counter()
                        seconds = task.fn()  # a child's task returns its own timing (no pipe in it)
                        task.times.append(seconds if isinstance(seconds, float) else time.perf_counter() - t0)
        finally:
            for child in children:
                child.close()

    rates = {t.name: t.rate for t in tasks}
    result = {"machine": info, "bandwidth_gbs": bandwidth / 1e9, "prompt": prompt, "repeats": repeats,
              "tok_s": rates, "bytes_per_token": per_token, "floor_tok_s": {}, "ratios": {}, "peak_rss_mib": {}}
    for kind in kinds:
        floor = bandwidth / per_token[kind]
        result["floor_tok_s"][kind] = floor
        b1 = rates[f"rwkvpy {kind} decode batch 1"]
        ratios = {"decode batch 1 / floor": b1 / floor}
        for B in batches:
            if B != 1:
                ratios[f"decode batch {B} / batch 1"] = rates[f"rwkvpy {kind} decode batch {B}"] / b1
        for peer in (f"official {OFFICIAL_STRATEGY.get(kind)}", f"transformers {kind}"):
            if f"{peer} decode batch 1" in rates:
                ratios[f"decode batch 1 / {peer}"] = b1 / rates[f"{peer} decode batch 1"]
        if compiled:
            c1 = rates[f"rwkvpy {kind} compiled decode batch 1"]
            ratios["compiled decode batch 1 / eager"] = c1 / b1
            ratios["compiled decode batch 1 / floor"] = c1 / floor
            peer = f"official {OFFICIAL_STRATEGY.get(kind)}"
            if f"{peer} decode batch 1" in rates:
                ratios[f"compiled decode batch 1 / {peer}"] = c1 / rates[f"{peer} decode batch 1"]
        for peer in ("official cpu fp32", "transformers fp32"):
            if f"{peer} prefill {prompt}" in rates:
                ratios[f"prefill / {peer}"] = rates[f"rwkvpy {kind} prefill {prompt}"] / rates[f"{peer} prefill {prompt}"]
        if kind != "fp32" and "fp32" in kinds:
            ratios["decode batch 1 / rwkvpy fp32"] = b1 / rates["rwkvpy fp32 decode batch 1"]
        result["ratios"][kind] = ratios
        result["peak_rss_mib"][kind] = peak_rss(path, kind) / 2**20
    if long_context:
        log(f"RSS after {long_context:,} tokens of context ({kinds[0]}, fresh process; minutes)")
        near, far = long_context_rss(path, kinds[0], long_context)
        result["long_context"] = {"kind": kinds[0], "tokens": long_context, "rss_mib_at_1000": near / 2**20,
                                  f"rss_mib_at_{long_context}": far / 2**20, "ratio": far / near}
    for line in format_result(result):
        log(line)
    return result


def format_result(r: dict) -> list[str]:
    lines = ["", f"{'measurement':44s} {'tok/s':>9s}"]
    lines += [f"{name:44s} {rate:9.1f}" for name, rate in r["tok_s"].items()]
    lines.append("")
    for kind, ratios in r["ratios"].items():
        lines.append(f"{kind}: {r['bytes_per_token'][kind] / 2**20:.0f} MiB read per token, floor "
                     f"{r['floor_tok_s'][kind]:.1f} tok/s, peak RSS {r['peak_rss_mib'][kind]:.0f} MiB")
        lines += [f"  {name:42s} x{value:.2f}" for name, value in ratios.items()]
    if "long_context" in r:
        lc = r["long_context"]
        lines.append(f"RSS decoding after {lc['tokens']:,} tokens / after 1,000 ({lc['kind']}): x{lc['ratio']:.4f}")
    return lines


def write_json(result: dict, path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


__all__ = ["run", "median_time", "memory_bandwidth", "bytes_per_token", "peak_rss", "long_context_rss", "machine"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in _CHILDREN:
    _CHILDREN[sys.argv[1]](*sys.argv[2:])
