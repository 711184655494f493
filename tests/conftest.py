"""Test setup: the project root on sys.path, the hub off (models and data come from the project), and Triton's
interpreter on when there is no GPU.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the session (vLLM and torch import
it too, during collection): triton decides per process whether `@triton.jit` builds interpreted kernels.
"""
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    # `slow`: runs a script end to end (subprocesses, vLLM engines); `pytest -m "not slow"` is the fast subset that
    # tools/mutate.py runs against every planted bug.
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (minutes); deselect with -m 'not slow'")
