"""The bundled default model: loads with no arguments, generates, and keeps its recorded quality.

The expected validation loss is the figure `experiments/bundle_default.py` printed for the
bundled (fp16) file when it was made, recorded in docs/experiments.md.
"""

import pytest
import torch

import rwkvpy
from rwkvpy.loading import default_model_path
from rwkvpy.tokenizers import ByteTokenizer
from rwkvpy.train.evaluate import evaluate_file

from conftest import SHARED_DATA  # noqa: E402

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
RECORDED_VAL_LOSS = 1.4671  # bundled (fp16), windows of 128 over the last 10%, 2026-11-22


def test_bundled_model_loads_and_generates():
    model = rwkvpy.load(default_model_path())
    assert model.config.vocab_size == 256
    gen = rwkvpy.generate(model, ByteTokenizer(), "ROMEO:", max_new_tokens=60, temperature=0)
    text = gen.run()
    assert len(text) > 0 and gen.finish_reason == "length"


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="no tinyshakespeare.txt in ../shared/data or $RWKVPY_SHARED_DATA")
def test_bundled_model_keeps_its_recorded_validation_loss():
    with torch.no_grad():
        r = evaluate_file(rwkvpy.load(default_model_path()), SHAKESPEARE, ctx_len=128)
    assert abs(r["loss"] - RECORDED_VAL_LOSS) < 1e-3
