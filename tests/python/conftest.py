"""Shared pytest setup: sapo_torch must be importable (CMake puts <build>/python on PYTHONPATH;
by hand: PYTHONPATH=build/<dir>/python /usr/bin/python3 -m pytest tests/python)."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # sapo_reference.py

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))

# The tests compare against double-precision references and time nothing; one intra-op
# thread keeps them quiet on a shared machine (the kernels are thread-count invariant).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo_root():
    return REPO
