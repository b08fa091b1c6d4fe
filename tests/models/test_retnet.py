"""RetNet: parallel == recurrent == chunkwise at the model level (fp64, 1e-10), gradients of the
chunkwise form == those of the parallel form, rows at different positions, the layout."""

import pytest
import torch

import rwkvpy.models.retnet as retnet_module
from conftest import assert_states_close, rel_err, run_steps
from rwkvpy.models.retnet import RetNet, RetNetConfig, build_model, parameter_shapes, random_state_dict
from rwkvpy.models.state import load_state

SHAPES = {
    "small": RetNetConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4),
    "paper": RetNetConfig(vocab_size=61, n_embd=48, n_layer=3, n_head=3, decay="log", normalize=True,
                          norm_eps=0.05, ffn_dim=70),
}


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def cfg(request):
    return SHAPES[request.param]


def model_for(cfg, dtype=torch.float64, seed=0):
    return build_model(cfg, random_state_dict(cfg, seed=seed), dtype=dtype).requires_grad_(False)


def tokens_for(cfg, B=2, T=150, seed=0):  # > CHUNK_LEN: several chunks and a shorter last one
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_chunkwise_equals_recurrent_equals_parallel_float64(cfg):
    model = model_for(cfg)
    toks = tokens_for(cfg)
    chunkwise, s1 = model(toks)
    recurrent, s2 = run_steps(model, toks)
    assert rel_err(recurrent, chunkwise) < 1e-10 and rel_err(s2.att, s1.att) < 1e-10
    model.requires_grad_(True)
    with torch.enable_grad():
        parallel, s3 = model(toks)  # the training form
    assert rel_err(parallel.detach(), chunkwise) < 1e-10 and rel_err(s3.att.detach(), s1.att) < 1e-10


@torch.no_grad()
@pytest.mark.parametrize("splits", [[1], [64], [63, 65, 130]])
def test_calls_continue_from_a_carried_state(cfg, splits):
    model = model_for(cfg)
    toks = tokens_for(cfg)
    whole, whole_state = model(toks)
    parts, state, prev = [], None, 0
    for cut in splits + [toks.shape[1]]:
        out, state = model(toks[:, prev:cut], state)
        parts.append(out)
        prev = cut
    assert rel_err(torch.cat(parts, 1), whole) < 1e-10
    assert rel_err(state.att, whole_state.att) < 1e-10 and torch.equal(state.pos, whole_state.pos)


@torch.no_grad()
def test_rows_at_different_positions_batch_as_alone():
    cfg = SHAPES["paper"]
    model = model_for(cfg, torch.float32)
    a, sa = model(tokens_for(cfg, B=1, T=5, seed=1))
    b, sb = model(tokens_for(cfg, B=1, T=11, seed=2))
    state = type(sa).concat([sa, sb])  # rows at positions 5 and 11
    toks = tokens_for(cfg, B=2, T=7, seed=3)
    both, _ = run_steps(model, toks, state)
    alone0, _ = run_steps(model, toks[:1], sa)
    alone1, _ = run_steps(model, toks[1:], sb)
    assert rel_err(both[0], alone0[0]) < 1e-5 and rel_err(both[1], alone1[0]) < 1e-5


def test_gradients_of_the_chunkwise_form_equal_the_parallel_form_float64(monkeypatch):
    cfg = SHAPES["paper"]
    model = model_for(cfg).requires_grad_(True)
    toks = tokens_for(cfg, T=100)
    target = torch.randn(2, 100, cfg.vocab_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads():
        model.zero_grad()
        (model(toks)[0] * target).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    parallel = grads()
    monkeypatch.setattr(retnet_module, "PARALLEL_MAX_T", 0)  # the training call takes the chunkwise form
    chunkwise = grads()
    for name in parallel:
        assert rel_err(chunkwise[name], parallel[name]) < 1e-9, name


def test_states_save_load_and_refusal(tmp_path):
    cfg = SHAPES["small"]
    model = model_for(cfg, torch.float32)
    _, state = model(tokens_for(cfg, B=1, T=9))
    state.save(tmp_path / "s.safetensors")
    assert torch.equal(load_state(tmp_path / "s.safetensors", model).att, state.att)
    with pytest.raises(rwkvpy_error()):
        load_state(tmp_path / "s.safetensors", model_for(cfg, torch.float32, seed=1))


def rwkvpy_error():
    from rwkvpy import RwkvpyError

    return RwkvpyError


@pytest.mark.parametrize("name", list(SHAPES))
def test_modules_have_the_shapes_written_once_in_parameter_shapes(name):
    with torch.device("meta"):
        model = RetNet(SHAPES[name])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == parameter_shapes(SHAPES[name])


def test_saved_and_loaded_through_rwkvpy(tmp_path):
    import rwkvpy
    from rwkvpy.checkpoint import save_native

    cfg = SHAPES["paper"]
    sd = random_state_dict(cfg, seed=2)
    save_native(cfg, sd, tmp_path / "m")
    model = rwkvpy.load(tmp_path / "m")
    assert model.config == cfg
    toks = tokens_for(cfg, B=1, T=20)
    with torch.no_grad():
        assert rel_err(model(toks)[0], build_model(cfg, sd)(toks)[0]) < 1e-6
