"""Who holds the memory: a dispatch-mode tracker that sees every tensor storage created and freed.

Keeps both the composition at the peak (what must fit at once) and each category's own maximum over the
window (what the papers' tables list per category). Works on real tensors (CPU or CUDA) and under
FakeTensorMode, so one breakdown method serves both the `measure` and the `simulate` engines. Each
storage is counted once (views share it), by its byte size, optionally rounded up to the CUDA caching
allocator's 512-byte blocks. A storage gets a category when it appears (from the current phase) and is
relabelled when its role is known: a gradient when autograd accumulates it into `.grad`, an optimizer
state when the optimizer keeps it.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Self

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from galore_bench.optim import layerwise
from galore_bench.optim.bnb4bit import quantization_constants
from galore_bench.optim.torchao_lowbit import inner_tensors
from galore_bench.units import CATEGORIES, allocator_bytes

# What a storage created during each phase is, until it is relabelled.
PHASE_CATEGORY = {"forward": "activations", "backward": "other", "optimizer": "other", "data": "other"}
_ACTIVE: list[MemoryTracker] = []


@contextlib.contextmanager
def optimizer_phase() -> Iterator[None]:
    """Label what an optimizer allocates inside backward (layer-wise, LOMO) as optimizer temporaries."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[-1].phase("optimizer"):
        yield


class MemoryTracker(TorchDispatchMode):
    """Live bytes per category and the composition at the peak."""

    def __init__(self, round_to: int = 1, device_type: str | None = None, record_events: bool = False) -> None:
        super().__init__()
        self.round_to = round_to
        # count only this device's storages (a GPU run's host tensors are not GPU memory); real tensors only:
        # a fake tensor's storage reports "meta", whatever device the tensor stands for
        self.device_type = device_type
        # (storage id, bytes) per allocation and (storage id, 0) per free, in order: for allocator.replay
        self.events: list[tuple[int, int]] | None = [] if record_events else None
        self.steady_from_event: int | None = None  # where reset_peak began the steady state, in `events`
        self._live: dict[int, tuple[weakref.ref, int, str]] = {}
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_breakdown = dict(self.totals)
        self.category_peaks = dict(self.totals)
        self._phase = "other"
        self._hooks: list[Any] = []

    # -- bookkeeping ------------------------------------------------------------------------------
    def _size(self, storage: torch.UntypedStorage) -> int:
        return allocator_bytes(storage.nbytes(), self.round_to)

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self._live or (self.device_type is not None and storage.device.type != self.device_type):
            return
        size = self._size(storage)

        def collected(_: object, key: int = key) -> None:
            self._free(key)

        self._live[key] = (weakref.ref(storage, collected), size, category)
        if self.events is not None:
            self.events.append((key, storage.nbytes()))
        self.totals[category] += size
        self.current += size
        self.category_peaks[category] = max(self.category_peaks[category], self.totals[category])
        if self.current > self.peak:
            self.peak = self.current
            self.peak_breakdown = dict(self.totals)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            if self.events is not None:
                self.events.append((key, 0))
            self.totals[entry[2]] -= entry[1]
            self.current -= entry[1]

    def label(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Give these tensors' storages `category` (start tracking them if they came from outside).

        A wrapper subclass (torchao's low-bit optimizer states) reports its outer dtype's size; what it
        really holds is its inner tensors (uint8 codes, fp32 scales), so those are counted instead."""
        for tensor in (inner for outer in tensors for inner in inner_tensors(outer)):
            storage = tensor.untyped_storage()
            entry = self._live.get(id(storage))
            if entry is None:
                self._add(storage, category)
            elif entry[2] != category:
                self.totals[entry[2]] -= entry[1]
                self.totals[category] += entry[1]
                self.category_peaks[category] = max(self.category_peaks[category], self.totals[category])
                self._live[id(storage)] = (entry[0], entry[1], category)

    def reset_peak(self) -> None:
        """Start a new peak window (used to measure the steady state from step 2 on)."""
        if self.events is not None:
            self.steady_from_event = len(self.events)
        self.peak = self.current
        self.peak_breakdown = dict(self.totals)
        self.category_peaks = dict(self.totals)

    def breakdown(self) -> dict[str, int]:
        return dict(self.peak_breakdown)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    # -- model hooks ------------------------------------------------------------------------------
    def watch_model(self, model: torch.nn.Module) -> None:
        """Count the weights and label each gradient the moment autograd stores it in `.grad`.

        Call before the method registers its own hooks: hooks run in registration order, so the
        gradient is labelled before a layer-wise update frees it.
        """
        self.label([p for p in model.parameters()], "weights")
        self.label(quantization_constants(model), "weights")  # 4-bit weights' absmax and code tables
        self.label([b for b in model.buffers()], "other")
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.label([param.grad], "gradients")

    def unwatch(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        category = PHASE_CATEGORY.get(self._phase, "other")
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                for inner in inner_tensors(value):
                    self._add(inner.untyped_storage(), category)
        return out

    def __enter__(self) -> Self:
        _ACTIVE.append(self)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        super().__exit__(*exc)


def _label_gradient(grad: torch.Tensor) -> None:
    if _ACTIVE:
        _ACTIVE[-1].label([grad], "gradients")


layerwise.set_phase_context(optimizer_phase)
layerwise.set_gradient_labeller(_label_gradient)  # optim/'s in-backward updates are labelled by the tracker
