"""``rwkvpy bench``'s measurement loop: the official package's RWKV-7, which must run in a process
of its own, takes its turns in the round-robin through a child process that times its calls."""

import pytest
import torch

from rwkvpy import bench
from rwkvpy.checkpoint import save_native, write_checkpoint
from rwkvpy.models import RWKV7Config, random_state_dict

pytest.importorskip("rwkv")

CFG = RWKV7Config(vocab_size=300, n_embd=128, n_layer=2)


def test_official_rwkv7_is_timed_in_turn_by_its_child(tmp_path, monkeypatch):
    """Every round times the official model once (in its child, which reports the seconds
    itself), between rwkvpy's own measurements, and the child is gone afterwards."""
    save_native(CFG, random_state_dict(CFG, seed=0), tmp_path / "m")
    children, order = [], []
    real_timed = bench.OfficialRwkv7.timed

    def timed(self, what):
        if self not in children:
            children.append(self)
        order.append(f"official {what}")
        return real_timed(self, what)

    real_rwkvpy_tasks = bench.rwkvpy_tasks

    def rwkvpy_tasks(*args, **kw):
        tasks, per_token = real_rwkvpy_tasks(*args, **kw)
        for task in tasks:
            task.fn = (lambda fn, name: lambda: order.append(name) or fn())(task.fn, task.name)
        return tasks, per_token

    monkeypatch.setattr(bench.OfficialRwkv7, "timed", timed)
    monkeypatch.setattr(bench, "rwkvpy_tasks", rwkvpy_tasks)
    monkeypatch.setattr(bench, "peak_rss", lambda path, kind: 0)  # fresh processes of their own: not under test
    result = bench.run(tmp_path / "m", kinds=("fp32",), batches=(1,), prompt=16, decode_tokens=2, repeats=3,
                       log=lambda *a: None)
    rates = result["tok_s"]
    assert rates["official cpu fp32 decode batch 1"] > 0 and rates["official cpu fp32 prefill 16"] > 0
    assert "decode batch 1 / official cpu fp32" in result["ratios"]["fp32"]
    one_round = ["rwkvpy fp32 decode batch 1", "rwkvpy fp32 prefill 16", "official decode", "official prefill"]
    assert order == one_round * 4  # the warm-up, then three rounds of one call each, in turn
    assert len(children) == 1 and children[0].proc.poll() == 0


def test_a_failing_official_child_is_an_error_not_a_hang(tmp_path):
    """A child that cannot load its model ends, and the parent says so instead of waiting."""
    write_checkpoint(CFG, {k: v for k, v in random_state_dict(CFG).items() if k != "head.weight"} | {
        "head.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth", "pth")
    with pytest.raises(RuntimeError, match="child process ended"):
        bench.OfficialRwkv7(tmp_path / "bad.pth", "cpu fp32", CFG.vocab_size, 16, 2)
