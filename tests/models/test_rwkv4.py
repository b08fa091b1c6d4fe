"""One set of weights, every form: whole sequence = token by token = any split, per batch row."""

import pytest
import torch

from conftest import SHAPE_ATT, assert_states_close, make_model, rel_err, run_steps
from rwkvpy import RwkvpyError
from rwkvpy.models import RWKV4Config, RWKV4State, build_model, random_state_dict

T = 40


def tokens_for(cfg, B=3, T=T, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_whole_equals_token_by_token(cfg):
    model = make_model(cfg)
    toks = tokens_for(cfg)
    logits, state = model(toks)
    step_logits, step_state = run_steps(model, toks)
    assert rel_err(step_logits, logits) < 1e-5
    assert_states_close(step_state, state, 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("splits", [[1], [17], [31, 32, 33], [5, 6, 20, 39]])
def test_any_split_with_state_carried(cfg, splits):
    model = make_model(cfg)
    toks = tokens_for(cfg)
    whole, whole_state = model(toks)
    parts, state, prev = [], None, 0
    for cut in splits + [T]:
        out, state = model(toks[:, prev:cut], state)
        parts.append(out)
        prev = cut
    assert rel_err(torch.cat(parts, 1), whole) < 1e-5
    assert_states_close(state, whole_state, 1e-5)


@torch.no_grad()
@pytest.mark.parametrize("chunk_len", [1, 8, 64])
def test_chunk_len_does_not_change_logits(chunk_len):
    model = make_model(SHAPE_ATT)
    toks = tokens_for(SHAPE_ATT)
    base, _ = model(toks)
    model.chunk_len = chunk_len
    assert rel_err(model(toks)[0], base) < 1e-5


@torch.no_grad()
def test_each_batch_row_equals_its_sequence_alone(cfg):
    model = make_model(cfg)
    toks = tokens_for(cfg, B=4)
    prefix_state = model(tokens_for(cfg, B=4, T=9, seed=5))[1]  # rows start from different states
    logits, state = model(toks, prefix_state)
    for b in range(4):
        alone, s = model(toks[b : b + 1], prefix_state.select(b))
        assert rel_err(alone[0], logits[b]) < 1e-5
        assert_states_close(s, state.select(b), 1e-5)


@torch.no_grad()
def test_dim_att_differs_from_n_embd():
    model = make_model(SHAPE_ATT)
    toks = tokens_for(SHAPE_ATT)
    logits, state = model(toks)
    assert state.num.shape == (SHAPE_ATT.n_layer, 3, SHAPE_ATT.dim_att)
    assert rel_err(run_steps(model, toks)[0], logits) < 1e-5


@torch.no_grad()
def test_calls_never_modify_the_given_state(cfg):
    model = make_model(cfg)
    _, state = model(tokens_for(cfg, T=5))
    before = state.clone()
    model(tokens_for(cfg, seed=1), state)
    model.step(tokens_for(cfg, T=1)[:, 0], state)
    assert_states_close(state, before, 0.0)


def test_state_operations():
    s = RWKV4State.zeros(n_layer=2, batch=3, n_embd=4, dim_att=5, model_id="abc")
    assert s.batch_size == 3 and s.n_layer == 2 and s.num.shape == (2, 3, 5)
    assert (s.max < -1e37).all() and s.num.dtype == torch.float32 and s.pos.tolist() == [0, 0, 0]

    def fill(k, v):
        return torch.tensor([7, 8, 9]) if k == "pos" else torch.randn_like(v)

    filled = RWKV4State(**{k: fill(k, v) for k, v in s.tensors().items()}, model_id="abc")
    rows = [filled.select(i) for i in range(3)]
    assert all(r.batch_size == 1 and r.model_id == "abc" for r in rows)
    assert rows[1].pos.tolist() == [8] and torch.equal(rows[1].num[:, 0], filled.num[:, 1])
    assert_states_close(RWKV4State.concat(rows), filled, 0.0)
    assert_states_close(filled.select([2, 0]), RWKV4State.concat([rows[2], rows[0]]), 0.0)
    c = filled.clone()
    c.num.add_(1)
    assert not torch.equal(c.num, filled.num)
    other = RWKV4State(**filled.select(0).tensors(), model_id="xyz")
    with pytest.raises(RwkvpyError, match="different models"):
        RWKV4State.concat([rows[0], other])


@torch.no_grad()
def test_state_counts_tokens_and_knows_its_model(cfg):
    model = make_model(cfg)
    _, s = model(tokens_for(cfg, B=2, T=7))
    _, s = model.step(torch.tensor([1, 2]), s)
    assert s.pos.tolist() == [8, 8] and s.model_id == model.fingerprint != ""
    assert make_model(cfg, seed=1).fingerprint != model.fingerprint
    assert make_model(cfg, dtype=torch.bfloat16).fingerprint == model.fingerprint


@torch.no_grad()
def test_last_only_returns_the_last_position():
    model = make_model(SHAPE_ATT)
    toks = tokens_for(SHAPE_ATT)
    full, s1 = model(toks)
    last, s2 = model(toks, last_only=True)
    assert last.shape == (3, 1, SHAPE_ATT.vocab_size)
    assert rel_err(last[:, 0], full[:, -1]) < 1e-6  # GEMM blocking differs with M; values do not
    assert_states_close(s1, s2, 0.0)


def test_training_forms_equal_inference_forms():
    """With grad enabled the model runs the matrix-product WKV on channels-first projections and
    may skip the state; the logits are those of the inference path."""
    model = make_model(SHAPE_ATT)
    toks = tokens_for(SHAPE_ATT)
    with torch.no_grad():
        ref, _ = model(toks)
    logits, state = model(toks, return_state=False)
    assert state is None and logits.requires_grad
    assert rel_err(logits.detach(), ref) < 1e-5
    logits, state = model(toks)
    assert rel_err(logits.detach(), ref) < 1e-5 and state.batch_size == 3


BF16_GRAD_TOL = 0.05  # bf16 keeps 8 bits: 2^-9 per rounding, a few roundings per product chain


def test_bf16_autocast_training_gives_the_fp32_gradients_within_bf16_precision():
    """Training's written-out backwards (projections, WKV) under bf16 autocast: gradients as in
    fp32, to bf16's precision (the products are bf16, the WKV fp32)."""
    model = make_model(SHAPE_ATT)
    toks = tokens_for(SHAPE_ATT)

    def gradients(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(toks, return_state=False)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), toks.flatten())
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    fp32, bf16 = gradients(False), gradients(True)
    for name, g in fp32.items():  # per parameter: the embedding and head cannot hide the rest
        assert torch.isfinite(bf16[name]).all(), name
        assert rel_err(bf16[name], g) < BF16_GRAD_TOL, name


def test_bad_inputs_are_named():
    model = make_model(SHAPE_ATT)
    with pytest.raises(RwkvpyError, match="token id 50 is outside"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(RwkvpyError, match="shape"):
        model(torch.tensor([1, 2]))
    with pytest.raises(RwkvpyError, match="batch"):
        model(torch.tensor([[1, 2]]), model.zero_state(2))
    with pytest.raises(RwkvpyError, match="integers"):
        model(torch.tensor([[1.0, 2.0]]))


def test_half_precision_weights_keep_fp32_state_and_decay():
    model = make_model(SHAPE_ATT, dtype=torch.bfloat16)
    assert model.blocks[0].att.time_decay.dtype == torch.float32
    assert model.blocks[0].att.key.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits, state = model(tokens_for(SHAPE_ATT))
    assert state.num.dtype == torch.float32 and torch.isfinite(logits).all()
    ref, _ = make_model(SHAPE_ATT)(tokens_for(SHAPE_ATT))
    assert rel_err(logits.float(), ref.detach()) < 0.1  # bf16 has 8 bits of mantissa


def test_the_model_takes_the_chunked_form_only_where_the_matmul_scale_underflows(monkeypatch):
    """Keys spanning more nats than the matrix-product form's one scale per row allows take the
    chunked form (and stay exact); keys of ordinary range never do."""
    import rwkvpy.models.rwkv4 as rwkv4

    calls = []
    chunked = rwkv4.wkv_chunked
    monkeypatch.setattr(rwkv4, "wkv_chunked", lambda *a, **kw: calls.append(1) or chunked(*a, **kw))
    cfg = RWKV4Config(vocab_size=50, n_embd=16, n_layer=1)
    tokens = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    for gain, expect in ((1.0, False), (80.0, True)):
        sd = random_state_dict(cfg, seed=3)
        sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"] * gain
        model = build_model(cfg, sd)
        calls.clear()
        with torch.no_grad():
            whole, _ = model(tokens)
            assert bool(calls) == expect
            rows, state = [], None
            for t in range(tokens.shape[1]):
                row, state = model.step(tokens[:, t], state)
                rows.append(row)
        # the recurrent form in fp32 drifts ~1e-4 over hundreds of tokens with such keys
        assert rel_err(torch.stack(rows, 1), whole) < 1e-3


def test_states_of_a_model_trained_in_process_load_into_the_saved_model(tmp_path):
    """The fingerprint follows the weights: after optimizer steps in this process, a state saved
    from the model is accepted by the model saved from it (and refused by the untrained one)."""
    import rwkvpy
    from rwkvpy.models import load_state

    model = make_model(SHAPE_ATT).train()
    untrained = model.fingerprint
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    toks = tokens_for(SHAPE_ATT)
    for _ in range(3):
        logits, _ = model(toks[:, :-1], return_state=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.fingerprint != untrained
    with torch.no_grad():
        _, state = model(toks[:1])
    state.save(tmp_path / "s.st")
    rwkvpy.save(model, tmp_path / "m")
    assert load_state(tmp_path / "s.st", rwkvpy.load(tmp_path / "m")).pos.tolist() == [T]
    with pytest.raises(RwkvpyError, match="different model"):
        load_state(tmp_path / "s.st", make_model(SHAPE_ATT))


@pytest.mark.parametrize("name", ["small", "odd", "ffn35", "att"])
def test_modules_have_the_shapes_written_once_in_parameter_shapes(name):
    from conftest import SHAPES

    from rwkvpy.models import RWKV4, parameter_shapes

    cfg = SHAPE_ATT if name == "att" else SHAPES[name]
    with torch.device("meta"):
        model = RWKV4(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got.items()) == list(parameter_shapes(cfg).items())
