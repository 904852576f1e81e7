"""The one-thread fixture the timing benchmarks share (a module, not a conftest.py: tests/ imports its own
`conftest` by name, and a second conftest module on the path would shadow it)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: timed pairs stay steady on a shared 2-core machine (a second thread competes with the
    other process's, and the ratio of medians drifts with whichever wins)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
