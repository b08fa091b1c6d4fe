"""Writes default_model_golden.json: the official ``rwkv`` package's logits for the bundled model.

    python tests/data/make_default_model_golden.py

Source of truth: BlinkDL's ``rwkv`` 0.8.32 (``RWKV_JIT_ON=0``, strategy ``cpu fp32``) running the
bundled model converted to an official ``.pth`` by ``rwkvpy convert`` (a renaming: the
conversion is itself proven by its logits check). Recorded: the logits after every token of a
fixed byte prompt, and 60 bytes of greedy continuation, each token fed back one at a time
through the official recurrent forward. rwkvpy's code computes none of these numbers.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

PROMPT = "ROMEO:\nWhat light through yonder window breaks?"
CONTINUATION = 60


def main() -> None:
    from rwkv.model import RWKV

    from rwkvpy.checkpoint import convert_checkpoint
    from rwkvpy.loading import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "default.pth"
        convert_checkpoint(default_model_path(), pth, "pth")
        model = RWKV(str(pth)[:-4], "cpu fp32", verbose=False)
        ids = list(PROMPT.encode())
        logits, state = [], None
        for t in ids:
            out, state = model.forward([t], state)
            logits.append([round(float(v), 6) for v in out])
        greedy = []
        for _ in range(CONTINUATION):
            t = int(max(range(len(out)), key=lambda i: float(out[i])))
            greedy.append(t)
            out, state = model.forward([t], state)
    golden = {"source": "rwkv 0.8.32 (BlinkDL), RWKV_JIT_ON=0, strategy 'cpu fp32', on the bundled model "
                        "converted to .pth; tests/data/make_default_model_golden.py",
              "prompt": PROMPT, "prompt_logits": logits, "greedy_tokens": greedy}
    path = Path(__file__).with_name("default_model_golden.json")
    path.write_text(json.dumps(golden) + "\n")
    print(f"wrote {path}: {len(logits)} positions, greedy {bytes(greedy)!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
