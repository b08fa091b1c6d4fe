"""Training: exact resume after SIGKILL, DDP equivalence, atomic checkpoints, init, bad input."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from rwkvpy import RwkvpyError
from rwkvpy.cli import main
from rwkvpy.models import RWKV4Config, build_model
from rwkvpy.models.rwkv4 import official_init
from rwkvpy.train import TrainConfig, Trainer, lr_at

TINY = dict(n_layer=2, n_embd=16, n_head=2, ctx_len=16, batch_size=4, max_iters=24, warmup_iters=4,
            eval_interval=8, eval_windows=8, ckpt_interval=6, log_interval=3, lr=3e-3, min_lr=3e-4,
            precision="fp32")  # pinned: runs compared for equality must not differ in a timing probe
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def read_log(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def run(*args, env=None, check=True):
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def train_cli(corpus, out, *extra, arch="rwkv4"):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
             if not (arch in ("rwkv4", "rwkv7") and k == "n_head")]
    if arch == "rwkv7":
        flags.append("--head-size=8")
    return ["-m", "rwkvpy", "train", "--data", corpus, "--out", out, "--arch", arch, *flags, *extra]


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7", "retnet", "gpt"])
def test_sigkill_then_resume_reaches_the_same_losses_and_the_model_runs(tmp_path, corpus, arch, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(*train_cli(corpus, full, arch=arch))
    # A child that SIGKILLs itself in the middle of step 16 (after the checkpoint at 12).
    script = textwrap.dedent(f"""
        import os, signal, sys
        from rwkvpy.train import Trainer
        original = Trainer.train_step
        def step(self):
            if self.step == 15:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self)
        Trainer.train_step = step
        from rwkvpy.cli import main
        sys.exit(main({[str(a) for a in train_cli(corpus, killed, arch=arch)[2:]]!r}))
    """)
    r = run("-c", script, check=False)
    assert r.returncode == -9
    assert torch.load(killed / "ckpt.pt", weights_only=True)["step"] == 12
    run(*train_cli(corpus, killed, "--resume", arch=arch))
    assert read_log(killed) == read_log(full)
    a = torch.load(full / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(killed / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The uninterrupted run's outputs: the plot, the log, and a model that generate and eval read
    # (in this process: the CLI's subprocess path is the training runs above).
    assert (full / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert read_log(full)[-1]["step"] == str(TINY["max_iters"])
    capsys.readouterr()
    assert main(["generate", "--model", str(full / "model"), "It is", "--max-tokens", "10", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out) > 1
    assert main(["eval", "--model", str(full / "model"), "--data", str(corpus), "--ctx-len", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # A uniform byte model scores ln 256 = 5.55 nats; 24 steps reach ~4.0 here for the RNNs and
    # ~4.6 for the GPT, which starts slower (learned positions; the unigram entropy of this text
    # is 2.86), so beating uniform by a nat (half a nat: the GPT) shows that training trained.
    assert result["split"] == "val" and result["tokens"] > 0
    assert result["loss"] < math.log(256) - (0.5 if arch == "gpt" else 1.0), result


@pytest.mark.parametrize("arch,port", [("rwkv4", 29517), ("rwkv7", 29518), ("retnet", 29519)])
def test_ddp_two_processes_equal_one(tmp_path, corpus, arch, port):
    one, two = tmp_path / "one", tmp_path / "two"
    run(*train_cli(corpus, one, "--max-iters=8", arch=arch))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        *train_cli(corpus, two, "--max-iters=8", arch=arch), env=env)
    a = torch.load(one / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(two / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert rel_err(b[k], a[k]) < 1e-5, k
    la, lb = read_log(one), read_log(two)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for key in ("train_loss", "val_loss"):
            if ra[key]:
                assert abs(float(ra[key]) - float(rb[key])) < 1e-5


def test_checkpoint_survives_a_crash_mid_write(tmp_path, corpus, monkeypatch):
    cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), **{**TINY, "max_iters": 6})
    trainer = Trainer(cfg)
    trainer.fit(progress=False)

    def crashing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    trainer.step += 1
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 6
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt", "config.json", "curves.png",
                                                                     "log.csv", "model"]


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7", "retnet", "gpt"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus, arch):
    """Loss and gradients of one step (no clipping): linear in the batch, so they must agree.
    (Weights after AdamW would not show a missing 1/grad_accum: Adam is scale-invariant.)"""
    def one_step(batch, accum):
        cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / f"{batch}x{accum}"), arch=arch, head_size=8,
                          **{**TINY, "batch_size": batch, "grad_accum": accum, "grad_clip": 0.0})
        trainer = Trainer(cfg)
        loss = trainer.train_step()
        return loss, {n: p.grad for n, p in trainer.model.named_parameters()}

    # The sampler draws the same windows either way: 2 x 4 draws are the first 8 of one stream.
    g = torch.Generator().manual_seed(3)
    halves = torch.cat([torch.randint(100, (4,), generator=g) for _ in range(2)])
    assert torch.equal(torch.randint(100, (8,), generator=torch.Generator().manual_seed(3)), halves)
    (loss_one, grads_one), (loss_acc, grads_acc) = one_step(8, 1), one_step(4, 2)
    assert abs(loss_one - loss_acc) < 1e-6
    for k in grads_one:
        assert rel_err(grads_acc[k], grads_one[k]) < 1e-5, k


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, corpus):
    def losses(compile_):
        cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / str(compile_)), compile=compile_,
                          **{**TINY, "n_layer": 1})
        trainer = Trainer(cfg)
        return [trainer.train_step() for _ in range(3)]

    eager, compiled = losses(False), losses(True)
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager, compiled)), (eager, compiled)


@pytest.mark.parametrize("chunk_len", [None, 4])
def test_model_gradients_equal_reference(monkeypatch, chunk_len):
    """The whole model in float64: gradients through the WKV form training uses (the
    matrix-product form; the chunked one is checked too) equal those of the O(T^2) form."""
    import rwkvpy.models.rwkv4 as rwkv4
    from rwkvpy.ops.wkv import wkv_chunked, wkv_reference

    cfg = RWKV4Config(vocab_size=40, n_embd=12, n_layer=2, dim_ffn=20)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in official_init(cfg, seed=1).items()}  # leave zero init
    x = torch.randint(0, 40, (3, 23), generator=torch.Generator().manual_seed(0))

    def grads():
        model = build_model(cfg, sd, dtype=torch.float64).train()
        model.chunk_len = chunk_len
        logits, _ = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x.roll(-1, 1).reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    matmul = rwkv4.wkv_matmul
    monkeypatch.setattr(rwkv4, "wkv_matmul", lambda *a, **kw: calls.append(1) or matmul(*a, **kw))
    forms = {"matmul": grads()}
    assert calls  # training takes the matrix-product form
    monkeypatch.setattr(rwkv4, "wkv_matmul", lambda *a, chunk_len, **_: wkv_chunked(*a, chunk_len=chunk_len))
    forms["chunked"] = grads()
    monkeypatch.setattr(rwkv4, "wkv_matmul", lambda w, u, k, v, s, **_: wkv_reference(w, u, k, v, s))
    reference = grads()
    for form, got in forms.items():
        for name in got:
            assert rel_err(got[name], reference[name]) < 1e-9, (form, name)


def test_official_init_matches_transformers_recipe():
    """HF's RwkvPreTrainedModel._init_weights implements the same time_decay / time_mix curves."""
    from transformers import RwkvConfig, RwkvForCausalLM

    from rwkvpy.checkpoint.hf import from_hf_name

    hf = RwkvForCausalLM(RwkvConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, intermediate_size=96))
    theirs = {from_hf_name(k): v for k, v in hf.state_dict().items()}
    ours = official_init(RWKV4Config(vocab_size=50, n_embd=24, n_layer=3))
    for key in ours:
        if any(s in key for s in ("time_decay", "time_mix")):
            assert torch.allclose(ours[key], theirs[key].float(), atol=1e-6), key
    for key in ("blocks.1.att.key.weight", "blocks.1.att.output.weight", "blocks.2.ffn.value.weight"):
        assert torch.count_nonzero(ours[key]) == 0
    assert ours["emb.weight"].abs().max() <= 1e-4
    assert torch.allclose(ours["blocks.0.att.time_first"][:3], torch.tensor([-1.2040, -0.7040, -1.7040]), atol=1e-4)


def test_rwkv7_official_init_follows_the_trainer_recipe():
    """Values from the formulas of RWKV-LM RWKV-v7/train_temp/src/model.py, written out here."""
    from rwkvpy.models.rwkv7 import RWKV7Config
    from rwkvpy.models.rwkv7 import official_init as init7

    C, L, N, V = 128, 3, 64, 300
    sd = init7(RWKV7Config(vocab_size=V, n_embd=C, n_layer=L, head_size=N), seed=0)
    c = 77  # a channel: position 13 in head 1
    assert sd["blocks.0.att.x_r"][0, 0, c].item() == pytest.approx(1 - (c / C) ** 0.2, abs=1e-6)
    assert sd["blocks.2.att.x_w"][0, 0, c].item() == pytest.approx(1 - (c / C) ** (0.9 * (1 - 2 / 3)), abs=1e-6)
    assert sd["blocks.1.ffn.x_k"][0, 0, c].item() == pytest.approx(1 - (c / C) ** ((1 - 1 / 3) ** 4), abs=1e-6)
    zig = ((c % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig *= abs(zig)
    lin = c / (C - 1) - 0.5
    www = -6 + 6 * (c / (C - 1)) ** (1 + 0.5 ** 0.3)  # layer 1 of 3: ratio_0_to_1 = 0.5
    assert sd["blocks.1.att.w0"][0, 0, c].item() == pytest.approx(www + 0.5 + zig * 2.5, abs=1e-5)
    assert sd["blocks.1.att.a0"][0, 0, c].item() == pytest.approx(-0.19 + zig * 0.3 + lin * 0.4, abs=1e-6)
    assert sd["blocks.1.att.v0"][0, 0, c].item() == pytest.approx(0.73 - lin * 0.4, abs=1e-6)
    assert sd["blocks.1.att.k_k"][0, 0, c].item() == pytest.approx(0.71 - lin * 0.1, abs=1e-6)
    assert torch.all(sd["blocks.1.att.k_a"] == 1.02) and torch.all(sd["blocks.0.att.r_k"] == -0.04)
    assert sd["blocks.1.att.ln_x.weight"][0].item() == pytest.approx((2 / 3) ** 0.7, abs=1e-6)
    assert "blocks.0.att.v0" not in sd  # layer 0 has no value residual
    for zero in ("blocks.1.att.w1", "blocks.1.att.a1", "blocks.1.att.g1", "blocks.1.att.output.weight",
                 "blocks.1.ffn.value.weight"):
        assert not sd[zero].any(), zero
    D = sd["blocks.1.att.w2"].shape[0]
    eye = torch.eye(D)
    assert torch.allclose(sd["blocks.1.att.w2"] @ sd["blocks.1.att.w2"].T, 0.01 * eye, atol=1e-6)
    assert torch.allclose(sd["blocks.1.att.key.weight"] @ sd["blocks.1.att.key.weight"].T, 0.01 * torch.eye(C),
                          atol=1e-6)
    head = sd["head.weight"]  # (V, C), V > C: orthonormal columns times 0.5 sqrt(V / C)
    assert torch.allclose(head.T @ head, 0.25 * V / C * torch.eye(C), atol=1e-4)
    assert sd["emb.weight"].abs().max() <= 1e-4


def test_lr_schedule():
    cfg = TrainConfig(data="x", lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000)
    assert lr_at(0, cfg) == pytest.approx(1e-5) and lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(5.5e-4) and lr_at(2000, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 2000))


def test_tokenized_data_is_cached_as_uint16(tmp_path, corpus):
    import rwkv.rwkv_tokenizer

    vocab = Path(rwkv.rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
    cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), tokenizer=str(vocab),
                      **{**TINY, "max_iters": 2, "ctx_len": 8})
    trainer = Trainer(cfg)
    cache = corpus.with_name("corpus.txt.world.bin")
    assert cache.is_file() and trainer.data.train.dtype.name == "uint16"
    assert trainer.data.vocab_size == 65530 and trainer.n_params > 65530 * 16
    stamp = cache.stat().st_mtime_ns
    Trainer(cfg)
    assert cache.stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("content,extra,pattern", [
    (b"", [], "the data file is empty"),
    (b"short", [], "fewer than ctx_len"),
    (TEXT.encode(), ["--ctx-len=100000"], "fewer than ctx_len"),
    (b"\xff\xfe not utf-8", ["--tokenizer=bytes-vocab"], "not UTF-8"),
])
def test_bad_data_is_one_line(tmp_path, content, extra, pattern):
    import rwkv.rwkv_tokenizer

    vocab = Path(rwkv.rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
    data = tmp_path / "d.txt"
    data.write_bytes(content)
    extra = [e.replace("bytes-vocab", str(vocab)) for e in extra]
    r = run("-m", "rwkvpy", "train", "--data", data, "--out", tmp_path / "o", *extra, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0]


def test_config_validation():
    with pytest.raises(RwkvpyError, match="unknown arch"):
        TrainConfig(data="x", arch="lstm")
    with pytest.raises(RwkvpyError, match="not divisible by n_head"):
        TrainConfig(data="x", arch="gpt", n_embd=30, n_head=4)
    with pytest.raises(RwkvpyError, match="max_iters must be >= 1"):
        replace(TrainConfig(data="x"), max_iters=0)


def test_precision_auto_is_decided_once_by_a_probe_and_recorded(tmp_path, corpus):
    from rwkvpy.train.trainer import choose_precision

    assert choose_precision(1.0, 0.5) == "bf16"  # AVX512-BF16: ~2x faster
    assert choose_precision(1.0, 27.0) == "fp32"  # AVX2: ~27x slower
    assert choose_precision(1.0, 0.95) == "fp32"  # a few percent is noise, not a reason
    cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), **{**TINY, "precision": "auto",
                                                                          "max_iters": 2})
    trainer = Trainer(cfg)
    chosen = trainer.cfg.precision
    assert chosen in ("fp32", "bf16") and trainer.precision_probe["chosen"] == chosen
    assert choose_precision(trainer.precision_probe["fp32_s"], trainer.precision_probe["bf16_s"]) == chosen
    trainer.fit(progress=False)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["config"]["precision"] == chosen


def test_resume_refuses_settings_that_differ_from_the_checkpoint(tmp_path, corpus):
    """A setting given again on resume that differs from the saved run's is an error naming the
    flag (it used to be dropped silently: --max-iters 20 on a run saved at 10 trained nothing);
    how the run executes (device, compile, the folder) comes from the command line."""
    cfg = TrainConfig(data=str(corpus), out_dir=str(tmp_path / "run"), **{**TINY, "max_iters": 4, "ckpt_interval": 4})
    Trainer(cfg).fit(progress=False)
    for change, flag in (({"max_iters": 8}, "--max-iters 8"), ({"lr": 1e-2}, "--lr 0.01"),
                         ({"data": str(tmp_path / "other.txt")}, "--data")):
        with pytest.raises(RwkvpyError, match=flag.replace(".", r"\.")):
            Trainer(replace(cfg, **change), resume=True)
    same_file = os.path.relpath(corpus)  # the same data by another path
    resumed = Trainer(replace(cfg, data=same_file, compile=True), resume=True)
    assert resumed.step == 4 and resumed.cfg.compile and resumed.cfg.max_iters == 4
    r = run(*train_cli(corpus, tmp_path / "run", "--resume", "--max-iters=9"), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--max-iters 9 differs" in r.stderr
