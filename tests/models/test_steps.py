"""``forward_in_steps``: a model's forward as steps of about one layer (for a server that reads
long prompts between decode steps), the same operations as ``forward``; ``step``, a family's own
one-token path, the same operations as ``forward`` on one token; the compiled step."""

import pytest
import torch

from rwkvpy.models import GPTConfig, RetNetConfig, RWKV4Config, RWKV7Config, build_model, random_state_dict
from rwkvpy.models.base import ModelBase, finish
from rwkvpy.ops.linear import plan_projections

from conftest import rel_err

CONFIGS = {
    "rwkv4": RWKV4Config(vocab_size=61, n_embd=40, n_layer=3, dim_ffn=72),
    "rwkv7": RWKV7Config(vocab_size=61, n_embd=128, n_layer=3),
    "retnet": RetNetConfig(vocab_size=61, n_embd=64, n_layer=3, n_head=2),
    "gpt": GPTConfig(vocab_size=61, n_layer=3, n_head=2, n_embd=32, block_size=64),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_steps_compute_forward_to_the_bit(arch):
    """The last item is forward's (logits, state), bit for bit, from a carried state; every item
    before it is None, one per layer for the recurrent families (and per internal segment of a
    long sequence); the GPT baseline, without layer steps, computes all at the first step."""
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=2))
    g = torch.Generator().manual_seed(0)
    prompt, more = (torch.randint(0, cfg.vocab_size, (2, n), generator=g) for n in (5, 11))
    with torch.no_grad():
        _, state = model(prompt)
        want_logits, want_state = model(more, state, last_only=True)
        items = list(model.forward_in_steps(more, state, last_only=True))
    assert all(item is None for item in items[:-1])
    assert len(items) - 1 == (0 if arch == "gpt" else cfg.n_layer)
    logits, got_state = items[-1]
    assert torch.equal(logits, want_logits)
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(got_state.__dict__), leaves(want_state.__dict__), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    with torch.no_grad():
        assert torch.equal(finish(model.forward_in_steps(more, state))[0], model(more, state)[0])


def _assert_same_step(a, b):
    (logits_a, state_a), (logits_b, state_b) = a, b
    assert torch.equal(logits_a, logits_b)
    assert state_a.model_id == state_b.model_id
    for name, t in state_a.tensors().items():
        assert t.dtype == state_b.tensors()[name].dtype and torch.equal(t, state_b.tensors()[name]), name


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "fp64"])
@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7"])
def test_step_is_forward_on_one_token_to_the_bit(arch, kind):
    """RWKV-4's and RWKV-7's own ``step`` (the blocks on (B, C) tensors, each layer's state
    written into the new state, mixes stacked) gives what ``forward`` gives on one token, bit
    for bit, in every storage with its planned kernels, from a zero and a carried state, and
    leaves the state it was given as it was."""
    cfg = CONFIGS[arch]
    kw = {"quantize": "int8"} if kind == "int8" else {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                                "fp64": torch.float64}[kind]}
    model = build_model(cfg, random_state_dict(cfg, seed=3), **kw)
    plan_projections(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 6), generator=g)
    with torch.no_grad():
        _, carried = model(tokens[:, :3])
        for state in (None, carried):
            before = None if state is None else state.clone()
            for t in range(3, 6):
                got = model.step(tokens[:, t], state)
                _assert_same_step(got, ModelBase.step(model, tokens[:, t], state))
                if before is not None:
                    _assert_same_step((got[0], state), (got[0], before))  # not modified
                state, before = got[1], got[1].clone()


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7"])
def test_step_follows_changed_weights(arch):
    """What ``step`` keeps between tokens (stacked mixes, WKV terms) follows the weights: after
    new memory under a parameter (``.data`` swapped, as ``module.to`` does, which keeps the
    version counter), an in-place change (as an optimizer step makes), a load of new tensors
    and a change of dtype, it gives what ``forward`` gives."""
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=3))
    tokens = torch.tensor([3, 7])
    mix = "time_mix_k" if arch == "rwkv4" else "x_k"
    decay = "time_decay" if arch == "rwkv4" else "x_w"
    with torch.no_grad():
        model.step(tokens)
        p = getattr(model.blocks[1].att, mix)
        p.data = torch.rand_like(p)
        _assert_same_step(model.step(tokens), ModelBase.step(model, tokens))
        getattr(model.blocks[1].att, mix).mul_(0.5)
        getattr(model.blocks[0].att, decay).add_(0.25)
        getattr(model.blocks[2].ffn, mix).mul_(0.5)
        _assert_same_step(model.step(tokens), ModelBase.step(model, tokens))
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd[f"blocks.0.att.{mix}"] = torch.rand_like(sd[f"blocks.0.att.{mix}"])
        model.load_state_dict(sd)
        _assert_same_step(model.step(tokens), ModelBase.step(model, tokens))
        model.double()
        _assert_same_step(model.step(tokens), ModelBase.step(model, tokens))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["rwkv7", "retnet"])
def test_compiled_step_writes_the_state_the_eager_step_writes(arch):
    """Decoding writes each layer's state into the next state (``out=``, no stacking); under
    torch.compile (``compile_step``) that gives the eager step's logits and states, token by
    token, from a zero state and from a prompt's: both as close to the same model in float64
    (fused loops round differently: the compiled step's error within twice the eager one's,
    plus 1e-6 of the tensor's scale; under AVX2's 8-float vectors the two fp32 forms differed
    by 1.1e-5 where each was 5-6e-6 from float64)."""
    cfg = CONFIGS[arch]
    sd = random_state_dict(cfg, seed=3)
    model = build_model(cfg, sd)
    exact = build_model(cfg, {k: v.double() for k, v in sd.items()}, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))

    def decode(m, state):
        out = []
        for t in range(tokens.shape[1]):
            logits, state = m.step(tokens[:, t], state)
            out.append([logits, *state.tensors().values()])
        return out

    with torch.no_grad():
        starts = [model.zero_state(2), model(tokens[:, :3])[1]]
        want = [step for s in (exact.zero_state(2), exact(tokens[:, :3])[1]) for step in decode(exact, s)]
        eager = [step for s in starts for step in decode(model, s)]
        model.compile_step()
        compiled = [step for s in starts for step in decode(model, s)]
    assert model.step.compiled is not None and model.step.trusted  # compiled, not the eager fallback
    for i, (got, ref, exact_) in enumerate(zip(compiled, eager, want, strict=True)):
        for a, b, c in zip(got, ref, exact_, strict=True):
            if not a.is_floating_point():
                assert torch.equal(a, b) and torch.equal(a, c)
                continue
            budget = 2 * rel_err(b.double(), c) + 1e-6
            assert rel_err(a.double(), c) <= budget, (i, rel_err(a.double(), c), budget)


class FakeCompile:
    """Stands in for torch.compile: returns ``make(eager_step)`` and counts its calls."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self, fn, **kwargs):
        inner = self.make(fn)

        def compiled(*args):
            self.calls += 1
            return inner(*args)
        return compiled


def _raise(fn):
    def fail(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore lines")
    return fail


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7", "gpt"])
@pytest.mark.parametrize("broken", ["wrong logits", "half the state unwritten", "no C++ compiler"])
def test_a_compiled_step_that_fails_or_disagrees_is_dropped_with_one_warning(arch, broken, monkeypatch, capsys):
    """compile_step checks the compiled step against the eager one at each new input shape
    before trusting it: a wrong one (logits off, or a state left partly unwritten, as a stale
    inductor cache produced) or one that fails to build is dropped with one warning line and
    decoding goes on eagerly, giving the eager step's results."""
    def wrong_logits(fn):
        return lambda tokens, state: (lambda out: (out[0] + 1.0, out[1]))(fn(tokens, state))

    def unwritten_state(fn):
        def step(tokens, state):
            logits, new = fn(tokens, state)
            first = next(name for name, t in new.tensors().items() if t.is_floating_point())
            t = getattr(new, first)
            t.view(-1)[: t.numel() // 2] = float("nan")
            return logits, new
        return step

    make = {"wrong logits": wrong_logits, "half the state unwritten": unwritten_state, "no C++ compiler": _raise}[broken]
    fake = FakeCompile(make)
    monkeypatch.setattr(torch, "compile", fake)
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=4))
    tokens = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, state = model(tokens[:, :2])
        want = [type(model).step(model, tokens[:, t], state) for t in (2, 3)]
        model.compile_step()
        got = [model.step(tokens[:, t], state) for t in (2, 3)]
    for (a, sa), (b, sb) in zip(got, want):
        assert torch.equal(a, b)
        for name, t in sa.tensors().items():
            assert torch.equal(t, sb.tensors()[name]), name
    assert fake.calls == 1  # tried once, then never again
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvpy: warning:") and "without torch.compile" in err[0]


@pytest.mark.parametrize("arch", ["rwkv4", "rwkv7"])
def test_a_compiled_step_that_agrees_is_trusted_per_input_shape(arch, monkeypatch, capsys):
    """A compiled step within the tolerance is used from its first agreement on, without the
    eager step beside it; a new batch size is checked again."""
    marker = 1e-7  # well inside the tolerance: shows whose logits come back
    fake = FakeCompile(lambda fn: lambda tokens, state: (lambda out: (out[0] * (1 + marker), out[1]))(fn(tokens, state)))
    monkeypatch.setattr(torch, "compile", fake)
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=5))
    eager_calls = []
    real_step = type(model).step
    monkeypatch.setattr(type(model), "step", lambda self, *a: eager_calls.append(1) or real_step(self, *a))
    with torch.no_grad():
        model.compile_step()
        for batch in (2, 2, 2, 3, 3):
            state = model.zero_state(batch)
            tokens = torch.arange(batch) % cfg.vocab_size
            logits, _ = model.step(tokens, state)
            ref, _ = real_step(model, tokens, state)
            assert not torch.equal(logits, ref) and rel_err(logits, ref) < 1e-6  # the compiled one's
    # per new batch size: the compiled call plus one eager call (the check), then compiled only
    assert fake.calls == 5 and len(eager_calls) == 5 + 2
    assert capsys.readouterr().err == ""


CHILD = """
import sys, torch
from rwkvpy.models import RWKV4Config, build_model, random_state_dict
torch.set_num_threads(1)
cfg = RWKV4Config(vocab_size=61, n_embd=48, n_layer=1, dim_ffn=168)
model = build_model(cfg, random_state_dict(cfg, seed=6))
tokens = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    _, eager = model(tokens[:, :2])
    compiled = eager
    model.compile_step()
    for t in range(2, 5):
        ref, eager = type(model).step(model, tokens[:, t], eager)
        out, compiled = model.step(tokens[:, t], compiled)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, (t, err)
assert model.step.compiled is not None, "fell back to eager"
print("ok")
"""


@pytest.mark.slow
def test_compiled_steps_of_two_cpu_capabilities_share_an_inductor_cache_safely(tmp_path):
    """The same step compiled under this CPU's capability and then under
    ATEN_CPU_CAPABILITY=avx2, one inductor cache folder: the second gives the eager step's
    logits, without the compiled-step check's warning (torch 2.13 reused the first's 16-float
    vector code under AVX2's 8 and left half the outputs unwritten)."""
    import os
    import platform
    import subprocess
    import sys

    from rwkvpy.ops.plan import cpu_info

    if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in cpu_info()[1]:
        pytest.skip("ATEN_CPU_CAPABILITY=avx2 needs an x86 CPU with AVX2")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("ATEN_CPU_CAPABILITY", None)
    for capability in (None, "avx2"):
        run_env = env if capability is None else {**env, "ATEN_CPU_CAPABILITY": capability}
        r = subprocess.run([sys.executable, "-c", CHILD], env=run_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (capability, r.stderr[-2000:])
        assert "warning" not in r.stderr, (capability, r.stderr[-2000:])
