"""The bundled default model: loads with no arguments, computes the official package's logits,
generates its greedy text, and keeps its recorded quality.

Golden values: tests/data/default_model_golden.json, written by the official ``rwkv`` package
(tests/data/make_default_model_golden.py says how). The expected validation loss is the figure
`experiments/bundle_default.py` printed for the bundled (fp16) file when it was made, recorded
in docs/experiments.md.
"""

import json
from pathlib import Path

import pytest
import torch

import rwkvpy
from rwkvpy.loading import default_model_path
from rwkvpy.tokenizers import ByteTokenizer
from rwkvpy.train.evaluate import evaluate_file

from conftest import SHARED_DATA, rel_err  # noqa: E402

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
RECORDED_VAL_LOSS = 1.4671  # bundled (fp16), windows of 128 over the last 10%, 2026-11-22


GOLDEN = json.loads((Path(__file__).parent / "data" / "default_model_golden.json").read_text())


def test_bundled_model_gives_the_official_logits_and_greedy_text():
    model = rwkvpy.load(default_model_path())
    assert model.config.vocab_size == 256
    prompt = list(GOLDEN["prompt"].encode())
    expected = torch.tensor(GOLDEN["prompt_logits"])
    with torch.no_grad():
        whole, _ = model(torch.tensor([prompt]))
    assert rel_err(whole[0], expected) < 1e-4
    gen = rwkvpy.generate(model, ByteTokenizer(), GOLDEN["prompt"], max_new_tokens=len(GOLDEN["greedy_tokens"]),
                          temperature=0)
    gen.run()
    assert gen.tokens == GOLDEN["greedy_tokens"] and gen.finish_reason == "length"


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="no tinyshakespeare.txt in ../shared/data or $RWKVPY_SHARED_DATA")
def test_bundled_model_keeps_its_recorded_validation_loss():
    with torch.no_grad():
        r = evaluate_file(rwkvpy.load(default_model_path()), SHAKESPEARE, ctx_len=128)
    assert abs(r["loss"] - RECORDED_VAL_LOSS) < 1e-3
