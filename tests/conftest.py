from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved to disk, so subprocesses can load the same model."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture, different weights (for identity checks)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), seed=1)


@pytest.fixture()
def tiny_host(tiny_model_dir):
    from kmd.editors.model import ModelHost, ModelSettings

    return ModelHost.load(ModelSettings(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture()
def one_torch_thread():
    """One torch thread for a test on the tiny model: its matrices are so small that a second
    thread only adds synchronisation (and is slow on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
