"""Runs the official ``rwkv`` package's RWKV-7 (x070) on a checkpoint and writes its logits.

The package picks its RWKV-7 class when ``RWKV_V7_ON=1`` is set before import, for the whole
process, so the tests run this file in a subprocess:

    RWKV_V7_ON=1 python official_rwkv7.py MODEL.pth TOKENS_JSON OUT.pt [STRATEGY]

OUT.pt holds ``sequence`` (T, V): one call in its sequence mode, and ``one`` (T, V): token by
token in its one-token mode (its state list is updated in place, so each call gets a copy).
"""

import json
import os
import sys

import torch

assert os.environ.get("RWKV_V7_ON") == "1", "set RWKV_V7_ON=1 before running"
from rwkv.model import RWKV  # noqa: E402


def main(model_path: str, tokens_json: str, out_path: str, strategy: str = "cpu fp32") -> None:
    tokens = json.loads(tokens_json)
    model = RWKV(model_path.removesuffix(".pth"), strategy)
    with torch.no_grad():
        sequence, _ = model.forward(list(tokens), None, full_output=True)
        rows, state = [], None
        for t in tokens:
            row, state = model.forward([t], [s.clone() for s in state] if state else None)
            rows.append(row.float())
    torch.save({"sequence": sequence.float(), "one": torch.stack(rows)}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
