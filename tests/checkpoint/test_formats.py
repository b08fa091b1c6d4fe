"""Formats, conversions, refusals and atomic writes."""

import subprocess
import sys

import pytest
import torch

import rwkvpy
from conftest import SHAPE_ATT, SHAPES
from rwkvpy import CheckpointError
from rwkvpy.checkpoint import read_checkpoint, read_pth, save_native, write_hf, write_pth
from rwkvpy.cli import main
from rwkvpy.models import random_state_dict

CFG = SHAPES["odd"]


@pytest.fixture
def sd():
    return random_state_dict(CFG, seed=11)


@pytest.fixture
def pth(tmp_path, sd):
    path = tmp_path / "model.pth"
    write_pth(sd, path)
    return path


def assert_bit_identical(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_pth_hf_native_pth_is_bit_identical(tmp_path, dtype, capsys):
    sd = random_state_dict(SHAPE_ATT, seed=2, dtype=dtype)
    write_pth(sd, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "nat"), "--to", "native"]) == 0
    assert main(["convert", str(tmp_path / "nat"), str(tmp_path / "b.pth"), "--to", "pth"]) == 0
    assert_bit_identical(sd, torch.load(tmp_path / "b.pth", weights_only=True))
    out = capsys.readouterr().out
    assert out.count("max |logit difference| = 0 ") == 3


def test_every_format_loads_to_the_same_model(tmp_path, sd, pth):
    write_hf(CFG, sd, tmp_path / "hf")
    write_hf(CFG, sd, tmp_path / "hf_sharded", max_shard_bytes=30_000)
    save_native(CFG, sd, tmp_path / "nat")
    bin_dir = tmp_path / "hf_bin"
    write_hf(CFG, sd, bin_dir)
    hf_sd = rwkvpy.io.read_safetensors(bin_dir / "model.safetensors")[0]
    (bin_dir / "model.safetensors").unlink()
    torch.save(hf_sd, bin_dir / "pytorch_model.bin")
    assert len(list((tmp_path / "hf_sharded").glob("model-*.safetensors"))) > 1

    paths = {"pth": pth, "hf": tmp_path / "hf", "hf_sharded": tmp_path / "hf_sharded",
             "native": tmp_path / "nat", "native_file": tmp_path / "nat" / "model.safetensors",
             "hf_bin": bin_dir, "hf_bin_file": bin_dir / "pytorch_model.bin"}
    toks = torch.arange(20)[None] % CFG.vocab_size
    base = None
    for name, path in paths.items():
        cfg, got, _ = read_checkpoint(path)
        assert cfg == CFG, name
        assert_bit_identical(got, sd)
        with torch.no_grad():
            logits = rwkvpy.load(path)(toks)[0]
        base = logits if base is None else base
        assert torch.equal(logits, base), name


def test_sharded_bin_index(tmp_path, sd):
    from rwkvpy.checkpoint.hf import to_hf_name

    write_hf(CFG, sd, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    hf_sd = {to_hf_name(k): v for k, v in sd.items()}
    keys = list(hf_sd)
    half = len(keys) // 2
    torch.save({k: hf_sd[k] for k in keys[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: hf_sd[k] for k in keys[half:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= half)}-of-00002.bin" for i, k in enumerate(keys)}
    import json

    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_bit_identical(read_checkpoint(tmp_path)[1], sd)


def test_shape_inferred_from_tensors_not_file_name(tmp_path, sd):
    path = tmp_path / "RWKV-4-Pile-14B-20230313-ctx8192.pth"
    write_pth(sd, path)
    assert rwkvpy.load(path).config == CFG


def test_unit_dims_on_vectors_are_accepted(tmp_path, sd):
    sd = dict(sd)
    sd["blocks.0.att.time_decay"] = sd["blocks.0.att.time_decay"][None]  # (1, A)
    sd["blocks.1.att.time_mix_k"] = sd["blocks.1.att.time_mix_k"].flatten()  # (C,)
    write_pth(sd, tmp_path / "m.pth")
    got = read_checkpoint(tmp_path / "m.pth")[1]
    assert got["blocks.0.att.time_decay"].shape == (CFG.dim_att,)
    assert got["blocks.1.att.time_mix_k"].shape == (1, 1, CFG.n_embd)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("key,version", [
    ("blocks.0.att.ln_x.weight", "RWKV-5"),
    ("blocks.0.att.gate.weight", "RWKV-5"),
    ("blocks.0.att.time_maa_x", "RWKV-6"),
    ("blocks.0.att.time_faaaa", "RWKV-6"),
    ("blocks.0.ffn.s_emb.weight", "RWKV-7a"),
    ("blocks.0.qkv.k1", "RWKV-7b"),
])
def test_other_rwkv_versions_are_refused(tmp_path, sd, key, version):
    sd = {**sd, key: torch.zeros(4)}
    write_pth(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=f"{version}.*{key}"):
        rwkvpy.load(tmp_path / "m.pth")


def expect_error(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        rwkvpy.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_not_rwkv_at_all(tmp_path):
    torch.save({"model.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "llama.pth")
    expect_error(tmp_path / "llama.pth", "missing key 'emb.weight'.*not an RWKV-4")


def test_missing_key(tmp_path, sd):
    del sd["blocks.2.ffn.value.weight"]
    write_pth(sd, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", "missing key 'blocks.2.ffn.value.weight'")


def test_unexpected_key(tmp_path, sd):
    sd["blocks.0.att.extra"] = torch.zeros(3)
    write_pth(sd, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", "unexpected key 'blocks.0.att.extra'")


def test_wrong_shape_names_key_and_shapes(tmp_path, sd):
    sd["blocks.1.ffn.receptance.weight"] = torch.zeros(37, 36)
    write_pth(sd, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", r"'blocks.1.ffn.receptance.weight' has shape \(37, 36\), expected \(37, 37\)")


def test_integer_tensor_refused(tmp_path, sd):
    sd["ln_out.bias"] = torch.zeros(37, dtype=torch.int64)
    write_pth(sd, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", "'ln_out.bias' has dtype torch.int64")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_pth(tmp_path, pth, keep):
    data = pth.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: int(len(data) * keep)])
    expect_error(bad, "cannot read as a PyTorch checkpoint")


def test_truncated_safetensors(tmp_path, sd):
    save_native(CFG, sd, tmp_path / "nat")
    f = tmp_path / "nat" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(f, "cannot read as safetensors")


def test_garbage_file(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"\x00not a checkpoint" * 10)
    expect_error(tmp_path / "x.pth", "cannot read as a PyTorch checkpoint")


class Payload:
    pass


def test_pickled_objects_are_not_executed(tmp_path, sd):
    torch.save({**sd, "evil": Payload()}, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", "weights_only=True")


def test_preconverted_by_rwkv_package(tmp_path, sd):
    torch.save({**sd, "_strategy": "cpu fp32", "_version": "0.7", "_rescale_layer": 0}, tmp_path / "m.pth")
    expect_error(tmp_path / "m.pth", "pre-converted by the rwkv package")


def test_hf_folder_of_another_model_type(tmp_path, sd):
    write_hf(CFG, sd, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "rwkv5"}')
    expect_error(tmp_path, "model_type is 'rwkv5'")


def test_hf_folder_without_weights(tmp_path, sd):
    write_hf(CFG, sd, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    expect_error(tmp_path, "no model.safetensors or pytorch_model.bin")


def test_native_config_disagreeing_with_tensors(tmp_path, sd):
    save_native(CFG, sd, tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"n_layer": 3', '"n_layer": 4'))
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    from rwkvpy.io import write_safetensors

    write_safetensors(sd, tmp_path / "model.safetensors", {})  # config only in config.json now
    expect_error(tmp_path, "missing key 'blocks.3")


def test_empty_folder_and_missing_path(tmp_path):
    expect_error(tmp_path, "no config.json")
    expect_error(tmp_path / "nope.pth", "no such file")


# --- atomic writes ---------------------------------------------------------------------


def test_crash_mid_write_keeps_previous_file(tmp_path, sd, pth, monkeypatch):
    before = pth.read_bytes()

    def crashing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        write_pth(sd, pth)
    assert pth.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [pth.name]  # no temp file left behind
    monkeypatch.undo()
    assert read_pth(pth).keys() == sd.keys()


# --- CLI -------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkvpy", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("problem", ["missing", "truncated", "v6", "shape"])
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, sd, pth, problem):
    path = tmp_path / "bad.pth"
    if problem == "missing":
        path = tmp_path / "does-not-exist.pth"
    elif problem == "truncated":
        path.write_bytes(pth.read_bytes()[:1000])
    elif problem == "v6":
        write_pth({**sd, "blocks.0.att.time_maa_x": torch.zeros(3)}, path)
    else:
        write_pth({**sd, "head.weight": torch.zeros(5, 37)}, path)
    r = run_cli("convert", path, tmp_path / "out", "--to", "native")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkvpy: error: ") and str(path) in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_cli_convert_refuses_to_overwrite(tmp_path, pth):
    (tmp_path / "out.pth").write_bytes(b"keep me")
    r = run_cli("convert", pth, tmp_path / "out.pth", "--to", "pth")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "out.pth").read_bytes() == b"keep me"
    assert run_cli("convert", pth, tmp_path / "out.pth", "--to", "pth", "--overwrite").returncode == 0


def test_cli_info(pth):
    r = run_cli("info", pth)
    assert r.returncode == 0 and "dim_ffn         101" in r.stdout


def test_model_save_then_load(tmp_path, pth):
    model = rwkvpy.load(pth)
    rwkvpy.save(model, tmp_path / "saved")
    back = rwkvpy.load(tmp_path / "saved")
    assert back.config == model.config
    assert_bit_identical(back.state_dict(), model.state_dict())


def test_load_dtype_and_device_arguments(pth):
    model = rwkvpy.load(pth, device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert model.blocks[0].att.time_first.dtype == torch.float32
    with pytest.raises(rwkvpy.RwkvpyError, match="unknown dtype 'int3'"):
        rwkvpy.load(pth, dtype="int3")


def test_written_files_get_the_usual_permissions(tmp_path, sd):
    import os

    umask = os.umask(0)
    os.umask(umask)
    write_pth(sd, tmp_path / "m.pth")
    assert (tmp_path / "m.pth").stat().st_mode & 0o777 == 0o666 & ~umask


def test_loaded_model_is_ready_for_inference(tmp_path):
    """load() returns a model that builds no autograd graph, even outside torch.no_grad()."""
    path = tmp_path / "m.pth"
    write_pth(random_state_dict(CFG), path)
    model = rwkvpy.load(path)
    assert not any(p.requires_grad for p in model.parameters())
    logits, state = model(torch.tensor([[1, 2, 3]]))
    assert logits.grad_fn is None and state.num.grad_fn is None
