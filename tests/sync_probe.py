"""Run by tests/test_fast_path.py: trains a tiny run and counts device -> host readbacks made by bigdit's code.

On a GPU each ``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.cpu()`` or ``.numpy()`` of a
device tensor stalls the CPU until the GPU has caught up, emptying the launch queue. The loop's code is
device-agnostic, so counting these calls from ``bigdit/`` on CPU tells where a GPU run would synchronise.
Prints one JSON line: readbacks per call site.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import bigdit
from bigdit.train import CONFIG_DIR, train

PACKAGE = str(Path(bigdit.__file__).parent)
calls: Counter = Counter()


def counting(name: str):
    original = getattr(torch.Tensor, name)

    def wrapped(self, *args, **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(PACKAGE):
            calls[f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}:{name}"] += 1
        return original(self, *args, **kwargs)

    setattr(torch.Tensor, name, wrapped)


for method in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
    counting(method)

with initialize_config_dir(CONFIG_DIR, version_base=None):
    cfg = compose("train", overrides=sys.argv[1:])
train(cfg)
print(json.dumps(dict(calls)))
