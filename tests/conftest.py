"""Shared fixtures: tiny scenarios written to tmp files, so tests never depend on shipped sizes."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario TOML body to a file and return its path."""

    def write(body: str, name: str = "case") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(body))
        return path

    return write


TINY_HEADER = """
[model]
size = "tiny"
[train]
batch_size = 2
seq_len = 32
dtype = "fp32"
steps = 4
[device]
budget = "1 GiB"
"""


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run faster on one thread, and a busy 2-core CI machine stops thrashing."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
