"""RWKV-4 in every weight storage (fp32, bf16, fp16, int8; planned kernels and compiled steps),
batched decoding, memory-mapped loading and ``rwkvpy quantize``, against plain fp32."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import SHAPES, logits_both_forms, rel_err

import rwkvpy
from rwkvpy.checkpoint import read_checkpoint, save_native, write_checkpoint
from rwkvpy.cli import main
from rwkvpy.errors import CheckpointError
from rwkvpy.models import RWKV4Config, RWKV4State, build_model, random_state_dict
from rwkvpy.models.rwkv4 import PROJECTIONS, RWKV4
from rwkvpy.ops.linear import plan_projections
from rwkvpy.ops.quant import quantize_state_dict

CFG = SHAPES["odd"]


@pytest.mark.parametrize("shape", ["odd", "ffn35"])  # widths 37/101 and 48/168 (multiples of 8)
@pytest.mark.parametrize("kind, tol", [("bf16", 0.02), ("fp16", 0.002), ("int8", 0.04)])
def test_narrow_models_stay_close_to_fp32(kind, tol, shape):
    """bf16/fp16/int8 logits vs fp32 logits of the same checkpoint, in both forms.

    Tolerances (relative to the largest logit) come from the storage: bf16 keeps 8 bits of
    mantissa, fp16 11, int8 7 bits per row plus the sign; bounds are ~3x the errors observed.
    Random weights are harder than trained ones here (decays up to e^6, keys of std 1.5)."""
    cfg = SHAPES[shape]
    sd = random_state_dict(cfg, seed=1)
    # one row: the recurrent form takes the matrix-vector kernels, the parallel form the others
    tokens = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    ref_whole, ref_steps = logits_both_forms(build_model(cfg, sd), tokens)
    kw = {"quantize": "int8"} if kind == "int8" else {"dtype": getattr(torch, {"bf16": "bfloat16",
                                                                             "fp16": "float16"}[kind])}
    model = build_model(cfg, sd, **kw)
    plan_projections(model)
    whole, steps = logits_both_forms(model, tokens)
    assert whole.dtype == torch.float32 and model.activation_dtype == torch.float32
    assert rel_err(whole, ref_whole) < tol
    assert rel_err(steps, ref_steps) < tol
    assert rel_err(steps, whole) < tol


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"dtype": torch.bfloat16}, {"quantize": "int8"}], ids=["fp32", "bf16", "int8"])
def test_compiled_step_decodes_as_the_eager_step(kw):
    """compile_step (torch.compile, opt-in) changes speed only: logits and states token by token,
    two streams, for every weight storage (widths 48/168: the int8 kernel is used)."""
    cfg = SHAPES["ffn35"]
    model = build_model(cfg, random_state_dict(cfg, seed=4), **kw)
    plan_projections(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, eager = model(tokens[:, :2])
        compiled = eager
        model.compile_step()
        assert "step" in model.__dict__
        for t in range(2, tokens.shape[1]):
            ref, eager = RWKV4.step(model, tokens[:, t], eager)
            out, compiled = model.step(tokens[:, t], compiled)
            assert rel_err(out, ref) < 1e-5
    assert model.step.compiled is not None and model.step.trusted  # compiled, not the eager fallback
    for name, x in compiled.tensors().items():
        assert torch.allclose(x.float(), eager.tensors()[name].float(), rtol=1e-5, atol=1e-6), name


def test_int8_model_is_the_dequantized_model():
    """Away from the bf16 kernel (parallel form), int8 == fp32 with the dequantized weights."""
    sd = random_state_dict(CFG, seed=2)
    qsd = quantize_state_dict(sd, PROJECTIONS)
    deq = {k: (qsd[k].float() * qsd[k + "_scale"][:, None]) if k + "_scale" in qsd else v
           for k, v in qsd.items() if not k.endswith("_scale")}
    tokens = torch.randint(0, CFG.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, sa = build_model(CFG, qsd)(tokens)
        b, sb = build_model(CFG, deq)(tokens)
    assert rel_err(a, b) < 1e-5 and rel_err(sa.num, sb.num) < 1e-4


def test_batched_decoding_equals_each_stream_alone():
    """Streams that join and leave a batch at different times, at different positions, get
    the same logits as when decoded alone (as a server batches them)."""
    model = build_model(CFG, random_state_dict(CFG, seed=3))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CFG.vocab_size, (1, n), generator=g) for n in (5, 17, 1, 9)]
    conts = [torch.randint(0, CFG.vocab_size, (12,), generator=g) for _ in prompts]
    join_at = [0, 0, 3, 6]  # decode step at which each stream joins the batch
    leave_at = [12, 7, 12, 10]  # ... and after how many of its own tokens it leaves

    with torch.no_grad():
        alone = []
        for p, c in zip(prompts, conts):
            _, s = model(p)
            rows = []
            for t in c:
                row, s = model.step(t.view(1), s)
                rows.append(row[0])
            alone.append(rows)

        active, state, got = [], None, {i: [] for i in range(len(prompts))}
        for step in range(20):
            for i, j in enumerate(join_at):
                if j == step:
                    _, s = model(prompts[i])
                    state = s if state is None else RWKV4State.concat([state, s])
                    active.append(i)
            if not active:
                break
            toks = torch.stack([conts[i][len(got[i])] for i in active])
            logits, state = model.step(toks, state)
            for row, i in enumerate(active):
                got[i].append(logits[row])
            keep = [r for r, i in enumerate(active) if len(got[i]) < leave_at[i]]
            if len(keep) < len(active):
                state, active = state.select(keep), [active[r] for r in keep]
            assert state.pos.tolist() == [prompts[i].shape[1] + len(got[i]) for i in active]
    for i in range(len(prompts)):
        assert len(got[i]) == leave_at[i]
        assert rel_err(torch.stack(got[i]), torch.stack(alone[i][: leave_at[i]])) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_states_do_not_rehash_planned_weights(monkeypatch, dtype):
    """A planned model keeps weights in other layouts and dtypes than its checkpoint's, which
    ``state_dict()`` converts back: the fingerprint that every new state carries must not go
    through that conversion on each call (it cost a copy of every weight per prompt)."""
    import rwkvpy.models.base as base

    model = build_model(CFG, random_state_dict(CFG, seed=3), dtype=dtype)
    plan_projections(model)
    first = model.zero_state(1).model_id
    hashed = []
    monkeypatch.setattr(base, "weights_fingerprint", lambda sd: hashed.append(1) or "changed")
    for _ in range(3):
        assert model.zero_state(1).model_id == first
    assert hashed == []
    with torch.no_grad():
        model.head.weight.mul_(2)  # an in-place change is still seen
    assert model.zero_state(1).model_id == "changed" and len(hashed) == 1


def test_int8_checkpoint_round_trip_and_errors(tmp_path):
    cfg = SHAPES["small"]
    qsd = quantize_state_dict(random_state_dict(cfg, seed=4), PROJECTIONS)
    save_native(cfg, qsd, tmp_path / "q")
    cfg2, back, _ = read_checkpoint(tmp_path / "q")
    assert cfg2 == cfg and all(torch.equal(back[k], qsd[k]) and back[k].dtype == qsd[k].dtype for k in qsd)
    model = rwkvpy.load(tmp_path / "q")
    assert model.quantization == "int8" and model.blocks[0].att.key.weight.dtype == torch.int8

    bad = dict(qsd)
    bad["blocks.0.ffn.key.weight"] = bad["blocks.0.ffn.key.weight"].float()
    save_native(cfg, bad, tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ffn\.key\.weight' has dtype torch.float32, expected int8"):
        read_checkpoint(tmp_path / "bad")
    del bad["blocks.0.ffn.key.weight_scale"]
    bad["blocks.0.ffn.key.weight"] = qsd["blocks.0.ffn.key.weight"]
    save_native(cfg, bad, tmp_path / "bad2")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0\.ffn\.key\.weight_scale'"):
        read_checkpoint(tmp_path / "bad2")
    with pytest.raises(CheckpointError, match="only in rwkvpy's format"):
        write_checkpoint(cfg, qsd, tmp_path / "q.pth", "pth")


def test_quantize_cli_reports_quality_and_refuses_a_bad_result(tmp_path, capsys):
    cfg = RWKV4Config(vocab_size=256, n_embd=32, n_layer=2)
    save_native(cfg, random_state_dict(cfg, seed=5), tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--int8", "--data", str(text),
                 "--ctx-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "top-1 agreement" in out
    assert rwkvpy.load(tmp_path / "q").quantization == "int8"
    # the same again: the destination exists
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--int8"]) == 1
    assert "already exists" in capsys.readouterr().err
    # an int8 model cannot be quantized again
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--int8"]) == 1
    assert "already quantized" in capsys.readouterr().err
    # a threshold no quantization meets: refused, nothing written
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q3"), "--int8", "--data", str(text),
                 "--ctx-len", "32", "--max-loss-increase", "-100"]) == 1
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "q3").exists()


def test_loading_maps_the_file_instead_of_copying_it(tmp_path):
    """Peak memory while loading a checkpoint in its own dtype stays far below its size."""
    cfg = RWKV4Config(vocab_size=4096, n_embd=512, n_layer=6)  # ~92 MiB in fp32
    sd = random_state_dict(cfg, seed=6)
    save_native(cfg, sd, tmp_path / "m")
    tiny = SHAPES["small"]
    save_native(tiny, random_state_dict(tiny), tmp_path / "tiny")
    size = sum(t.numel() * t.element_size() for t in sd.values())
    # VmHWM (peak RSS of this process image): ru_maxrss would carry pytest's peak across exec
    code = (
        "import json, sys, rwkvpy\n"
        "def hwm(): return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "rwkvpy.load(sys.argv[2])  # first load: libraries' one-off allocations\n"
        "base = hwm()\n"
        "m = rwkvpy.load(sys.argv[1])\n"
        "print(json.dumps((hwm() - base) * 1024))\n"
    )
    # Safe kernels: a plan may store a matrix transposed, which copies it (once, by design).
    env = {**os.environ, "RWKVPY_KERNELS": "safe"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, check=True, env=env)
    growth = json.loads(out.stdout)
    assert growth < 0.5 * size, f"loading grew RSS by {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"
