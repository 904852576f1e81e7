"""torchao's 8-bit and 4-bit AdamW (torchao.optim), made measurable.

torchao's step is one `torch.compile`d kernel per parameter (fullgraph). Two things stop a memory tracker
from watching it, and this module answers each:

- torch.compile refuses to run under a Python dispatch mode (our tracker is one). The real step therefore
  runs with the dispatch modes suspended: its weight update is in place, its states are counted when the
  trainer labels them after the step, and the compiled kernel's own temporaries are NOT counted (they live
  inside one fused kernel; the record says so).
- Under fake tensors the compiled kernel cannot run at all. A fake step creates the states with torchao's
  own `_new_buffer` (the same code, so the same tensors, on fake storage) and the fp32 `step` counter, and
  skips the arithmetic, whose values a simulation never reads.

The low-bit states are tensor subclasses whose wrapper reports the parameter's dtype (BF16-sized under a
naive storage count); `inner_tensors` lists what they really hold: uint8 codes, fp32 block scales and the
fp32 quantization map.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.utils._python_dispatch import _disable_current_modes, is_traceable_wrapper_subclass

__all__ = ["BLOCK_SIZES", "MIN_QUANTIZED_SIZE", "QMAP_ENTRIES", "inner_tensors", "lowbit_adamw"]

BLOCK_SIZES = {8: 256, 4: 128}
"""torchao's default block sizes: one fp32 scale per 256 (8-bit) or 128 (4-bit) values."""
QMAP_ENTRIES = {8: 256, 4: 16}
"""Entries of the fp32 quantization map each quantized state tensor carries (its own copy)."""
MIN_QUANTIZED_SIZE = 4096
"""torchao quantizes a state only when the parameter has >= 4096 values and a whole number of blocks."""


def inner_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a (possibly nested) wrapper subclass's data, or the tensor itself."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        for name in names:
            yield from inner_tensors(getattr(tensor, name))
    else:
        yield tensor


def _tensor_lr(groups: list[dict[str, Any]]) -> None:
    """torchao keeps lr as a tensor; an LR scheduler writes floats: put each back as a tensor."""
    for group in groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)


@cache
def _classes() -> dict[int, type]:
    from torchao.optim import AdamW4bit, AdamW8bit, subclass_4bit, subclass_8bit  # torchao only when used

    with unset_fake_temporarily():  # its quantization maps are computed once, as Python lists, from real tensors
        for module in (subclass_8bit, subclass_4bit):
            module.get_qmap_signed()
            module.get_qmap_unsigned()

    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if params and is_fake(params[0]):
            self._fake_step(params)
            return None
        _tensor_lr(self.param_groups)
        with _disable_current_modes():  # torch.compile refuses a dispatch mode: the tracker steps aside
            return base_step(self, closure)

    @torch.no_grad()
    def fake_step(self: Any, params: list[torch.Tensor]) -> None:
        """torchao's state creation (its own `_new_buffer`) and counter, without the compiled kernel."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = self._new_buffer(p, True)
                state["exp_avg_sq"] = self._new_buffer(p, False)
            state["step"] += 1

    base_step = AdamW8bit.step  # torchao's own step (both classes inherit the same one)
    made = {}
    for bits, base in ((8, AdamW8bit), (4, AdamW4bit)):
        made[bits] = type(f"Traceable{base.__name__}", (base,), {"step": step, "_fake_step": fake_step})
    return made


def lowbit_adamw(bits: int, params: Any, **hyper: Any) -> torch.optim.Optimizer:
    """torchao's AdamW8bit or AdamW4bit (`bits`), stepping as described above."""
    if bits not in BLOCK_SIZES:
        raise ValueError(f"torchao low-bit AdamW has 8 or 4 bits, got {bits}")
    return _classes()[bits](params, **hyper)
