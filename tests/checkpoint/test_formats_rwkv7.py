"""RWKV-7 checkpoints in every format: official .pth, flash-linear-attention's Hugging Face
folder (names from its utils/convert_from_rwkv7.py) and rwkvpy's; conversions are renamings."""

import json

import pytest
import torch

import rwkvpy
from rwkvpy.checkpoint import read_checkpoint, write_hf, write_pth
from rwkvpy.cli import main
from rwkvpy.io import read_safetensors
from rwkvpy.models.rwkv7 import RWKV7Config, random_state_dict

CFG = RWKV7Config(vocab_size=90, n_embd=48, n_layer=3, head_size=16, dim_ffn=100, d_decay=5, d_aaa=7, d_mv=3,
                  d_gate=9)
TRAINER_CFG = RWKV7Config(vocab_size=90, n_embd=48, n_layer=3, head_size=16, dim_ffn=100, d_decay=5, d_aaa=7,
                          d_mv=3, d_gate=9, layer0_value_lora=True)


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_pth_hf_native_pth_is_bit_identical(tmp_path, dtype, capsys):
    sd = random_state_dict(CFG, seed=2, dtype=dtype)
    write_pth(sd, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "nat"), "--to", "native"]) == 0
    assert main(["convert", str(tmp_path / "nat"), str(tmp_path / "b.pth"), "--to", "pth"]) == 0
    assert_bit_identical(sd, torch.load(tmp_path / "b.pth", weights_only=True))
    assert capsys.readouterr().out.count("max |logit difference| = 0 ") == 3


def test_hf_folder_uses_flash_linear_attention_names(tmp_path):
    sd = random_state_dict(CFG, seed=3)
    write_hf(CFG, sd, tmp_path)
    hf, _ = read_safetensors(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "rwkv7" and cfg["decay_low_rank_dim"] == 5 and cfg["v_low_rank_dim"] == 3
    assert torch.equal(hf["model.embeddings.weight"], sd["emb.weight"])
    assert torch.equal(hf["lm_head.weight"], sd["head.weight"])
    assert torch.equal(hf["model.layers.0.pre_norm.weight"], sd["blocks.0.ln0.weight"])
    assert torch.equal(hf["model.layers.1.attn_norm.bias"], sd["blocks.1.ln1.bias"])
    assert torch.equal(hf["model.layers.1.attn.r_proj.weight"], sd["blocks.1.att.receptance.weight"])
    assert torch.equal(hf["model.layers.2.attn.g_norm.weight"], sd["blocks.2.att.ln_x.weight"])
    assert torch.equal(hf["model.layers.1.attn.w_lora.lora.0.weight"], sd["blocks.1.att.w1"].t())
    assert torch.equal(hf["model.layers.1.attn.w_lora.lora.2.weight"], sd["blocks.1.att.w2"].t())
    assert torch.equal(hf["model.layers.1.attn.w_lora.lora.2.bias"], sd["blocks.1.att.w0"].view(-1))
    assert torch.equal(hf["model.layers.2.attn.g_lora.lora.2.weight"], sd["blocks.2.att.g2"].t())
    assert hf["model.layers.0.attn.x_r"].shape == (1, 1, 48) and hf["model.layers.0.attn.k_k"].shape == (48,)
    assert torch.equal(hf["model.layers.0.ffn.key.weight"], sd["blocks.0.ffn.key.weight"])
    assert hf["model.layers.0.ffn.x_k"].shape == (48,)


def test_trainer_files_with_layer0_value_lora_convert_with_equal_logits(tmp_path, capsys):
    """Layer 0's v0/v1/v2 take no part in the computation; the HF layout has no place for them."""
    sd = random_state_dict(TRAINER_CFG, seed=4)
    write_pth(sd, tmp_path / "t.pth")
    cfg, got, _ = read_checkpoint(tmp_path / "t.pth")
    assert cfg.layer0_value_lora and "blocks.0.att.v1" in got
    assert main(["convert", str(tmp_path / "t.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "max |logit difference| = 0 " in capsys.readouterr().out
    cfg2, back, _ = read_checkpoint(tmp_path / "hf")
    assert not cfg2.layer0_value_lora
    assert_bit_identical({k: v for k, v in sd.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1",
                                                                         "blocks.0.att.v2"))}, back)


def test_info_names_the_family_and_ranks(tmp_path, capsys):
    write_pth(random_state_dict(CFG), tmp_path / "m.pth")
    assert main(["info", str(tmp_path / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "rwkv7" in out and "d_decay         5" in out and "d_gate          9" in out


@pytest.mark.parametrize("drop,match", [
    ("blocks.1.att.a1", "missing key 'blocks.1.att.a1'"),
    ("blocks.0.att.w1", "missing key 'blocks.0.att.w1': not an RWKV-7"),
])
def test_missing_keys_are_named(tmp_path, drop, match):
    sd = random_state_dict(CFG)
    del sd[drop]
    write_pth(sd, tmp_path / "m.pth")
    with pytest.raises(rwkvpy.CheckpointError, match=match):
        rwkvpy.load(tmp_path / "m.pth")


def test_wrong_lora_shape_is_named(tmp_path):
    sd = random_state_dict(CFG)
    sd["blocks.2.att.a2"] = torch.zeros(6, 48)
    write_pth(sd, tmp_path / "m.pth")
    with pytest.raises(rwkvpy.CheckpointError, match=r"'blocks.2.att.a2' has shape \(6, 48\), expected \(7, 48\)"):
        rwkvpy.load(tmp_path / "m.pth")
