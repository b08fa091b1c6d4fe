"""Bundle a trained model as rwkvpy's default: fp16 storage, time_decay/time_first kept fp32.

    python experiments/bundle_default.py runs/default_model/model ../shared/data/tinyshakespeare.txt

Prints the validation loss (last 10%, windows of 128 bytes) of the trained fp32 model and of
the bundled copy, so the cost of the smaller file is measured, not assumed.
"""

import sys

import torch

import rwkvpy
from rwkvpy.checkpoint import read_checkpoint, save_native
from rwkvpy.loading import DEFAULT_MODEL
from rwkvpy.train.evaluate import evaluate_file

src, data = sys.argv[1], sys.argv[2]
cfg, sd, _ = read_checkpoint(src)
keep = ("att.time_decay", "att.time_first")
small = {k: v if k.endswith(keep) else v.half() for k, v in sd.items()}
save_native(cfg, small, DEFAULT_MODEL)
for name, path in (("trained (fp32)", src), ("bundled (fp16)", DEFAULT_MODEL)):
    r = evaluate_file(rwkvpy.load(path, dtype=torch.float32), data, ctx_len=128)
    print(f"{name}: val loss {r['loss']:.4f} nats/byte, {r['bits_per_byte']:.4f} bits/byte over {r['tokens']:,} bytes")
