"""What libraries do that fake tensors cannot follow, made traceable for the length of a simulated step: each shim
is active only under fake tensors and undone after, so measure runs the libraries untouched."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes


@contextlib.contextmanager
def moves_in_place_are_noops(active: bool) -> Iterator[None]:
    """Under fake tensors, make Module.to() a no-op when nothing would change, and a dtype cast an in-place one.

    Module.to() swaps fake parameters, and FakeTensors carry a weakref that forbids the swap; libraries
    (peft) call .to(base_layer.device) on modules already there, and cast adapters to a base layer's compute
    dtype. A real move to another device still goes through.
    """
    if not active:
        yield
        return
    original = torch.nn.Module.to

    def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if any(device is not None and t.device != device for t in tensors):
            return original(module, *args, **kwargs)
        for t in tensors:  # a cast in place (peft casts 4-bit layers' adapters to their compute dtype)
            if dtype is not None and t.dtype != dtype and t.is_floating_point():
                t.data = t.data.to(dtype)
        return module

    torch.nn.Module.to = to  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.nn.Module.to = original  # type: ignore[method-assign]


@contextlib.contextmanager
def one_value_draws_have_values(active: bool) -> Iterator[None]:
    """Under fake tensors, give `torch.rand(1)` a value: peft's LyCORIS adapters (LoHa, LoKr) decide their module
    dropout in Python, `torch.rand(1) > p`, and a fake draw has no value to compare. The one value is drawn for
    real and held as a fake-tensor constant (the same 4-byte tensor a real step allocates), which fake tensors
    compare; every other draw stays fake."""
    if not active:
        yield
        return
    original = torch.rand

    def rand(*size: Any, **kwargs: Any) -> torch.Tensor:
        if size not in ((1,), ((1,),), ([1],)) or kwargs:
            return original(*size, **kwargs)
        with _disable_current_modes():
            value = float(original(1))
        return torch.tensor([value])

    torch.rand = rand  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.rand = original
