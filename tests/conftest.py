"""Shared fixtures. Real data is found through METALEARN_DATA_DIR (CI sets it to
../shared/data); without it, the shared/data folder beside the checkout is used."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# the configs tests compose read it too (paths.data_dir), not only the data_root fixture
if SHARED_DATA.is_dir():
    os.environ.setdefault("METALEARN_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist runs one test process per core: one torch thread each (and in the runs they
# start), or the processes fight over the cores
PARALLEL = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL:
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("METALEARN_DATA_DIR", SHARED_DATA))
    if not (root / "omniglot").is_dir():
        pytest.fail(
            f"real data not found under {root}: set METALEARN_DATA_DIR to the folder "
            "holding omniglot/ and quickdraw/ (see README)"
        )
    return root


@pytest.fixture(autouse=True)
def _default_signal_handling():
    """Each test starts with Python's default SIGINT/SIGTERM handling. Lightning leaves SIGINT
    ignored in a process where a fit ended by KeyboardInterrupt (a test of the second Ctrl-C
    does that), a shell starts background jobs with SIGINT ignored, and the runs a test starts
    inherit an ignored signal; under xdist a worker runs many tests, in any order."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1 if PARALLEL else 2)
    yield
