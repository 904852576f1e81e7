"""QLoRA's frozen base: projections quantized to 4 bits by bitsandbytes (NF4 or FP4, optional double quantization).

The real path is bitsandbytes' own: a `Linear4bit` whose `Params4bit` quantizes the model's weight with
`bitsandbytes.functional.quantize_4bit`. Under fake tensors (simulate) a `Params4bit` cannot be made (it
re-wraps its data as a new subclass, which a FakeTensor refuses), so the same `quantize_4bit` runs on the fake
weight and its packed result becomes a plain frozen Parameter carrying the same `quant_state`; bitsandbytes'
forward reads only those two, and its ops have fake implementations, so the step traces as it runs.

What a quantized weight holds (`weight_bytes` states it; a test holds it to the real tensors):
- the packed codes: two 4-bit values per uint8, ceil(n / 2) bytes;
- one absmax per block of 64 values: fp32, or with double quantization a uint8 code per block, plus that
  quantization's own fp32 absmax per 256 blocks, its 256-entry fp32 code table and an fp32 offset scalar;
- its own 16-entry fp32 NF4 / FP4 code table.
The absmax and tables are not Parameters: `quantization_constants` finds them, so the tracker counts them as
weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, is_fake, unset_fake_temporarily

__all__ = ["BLOCKSIZE", "NESTED_BLOCKSIZE", "quantization_constants", "quantize_projection", "weight_bytes",
           "weight_tensor_bytes"]

BLOCKSIZE = 64
"""Values per absmax block (bitsandbytes' default for 4-bit weights, as QLoRA uses)."""
NESTED_BLOCKSIZE = 256
"""Absmax values per block of the double quantization (bitsandbytes' fixed choice)."""
CODE_ENTRIES = 16
"""A 4-bit code table (NF4 or FP4): 16 fp32 values, one copy per quantized weight."""
NESTED_CODE_ENTRIES = 256
"""The 8-bit dynamic code table of the double quantization: 256 fp32 values, one copy per quantized weight."""


def weight_tensor_bytes(numel: int, double_quant: bool) -> list[int]:
    """The byte size of each tensor one quantized weight of `numel` values holds (see the module docstring)."""
    n_blocks = -(-numel // BLOCKSIZE)
    sizes = [-(-numel // 2), CODE_ENTRIES * 4]
    if not double_quant:
        return [*sizes, n_blocks * 4]
    return [*sizes, n_blocks, -(-n_blocks // NESTED_BLOCKSIZE) * 4, NESTED_CODE_ENTRIES * 4, 4]


def weight_bytes(numel: int, double_quant: bool) -> int:
    """Exact bytes of one quantized weight (packed codes, absmax, tables), before any allocator rounding."""
    return sum(weight_tensor_bytes(numel, double_quant))


def _state_tensors(state: Any) -> Iterator[torch.Tensor]:
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    if getattr(state, "state2", None) is not None:
        yield from _state_tensors(state.state2)


def quantization_constants(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The absmax and code tables of every 4-bit weight in the model (they are weights, but not Parameters)."""
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            yield from _state_tensors(state)


@contextlib.contextmanager
def _fp32_tables() -> Iterator[None]:
    """bitsandbytes builds each NF4 / FP4 table from a Python list, in torch's default dtype: the fp32 it assumes,
    not the training dtype a model's preparation runs under."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _fake_dynamic_map(like: torch.Tensor) -> Iterator[None]:
    """bitsandbytes caches the double quantization's code table as one real tensor per process; a traced
    quantization must read a fake copy of it (a fake op refuses real inputs)."""
    from bitsandbytes import functional

    if not isinstance(like, FakeTensor):
        yield
        return
    with unset_fake_temporarily():
        real = functional.name2qmap.get("dynamic")
        if real is None:
            real = functional.create_dynamic_map().to(like.device)
    functional.name2qmap["dynamic"] = like.fake_mode.from_tensor(real)
    try:
        yield
    finally:
        functional.name2qmap["dynamic"] = real


def quantize_projection(linear: torch.nn.Linear, quant_type: str, double_quant: bool,
                        compute_dtype: torch.dtype) -> torch.nn.Module:
    """A frozen bitsandbytes Linear4bit holding `linear`'s weight quantized (and its bias as it was)."""
    import bitsandbytes as bnb

    rows, cols = linear.weight.shape
    with unset_fake_temporarily():  # the module's placeholder weight is real (on meta) and replaced at once
        module = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=compute_dtype,
                                   compress_statistics=double_quant, quant_type=quant_type, device="meta")
    source = linear.weight.detach()
    if is_fake(source):
        with _fake_dynamic_map(source), _fp32_tables():
            packed, state = bnb.functional.quantize_4bit(source.contiguous(), blocksize=BLOCKSIZE,
                                                         compress_statistics=double_quant, quant_type=quant_type)
        weight = torch.nn.Parameter(packed, requires_grad=False)
        # what Params4bit carries besides its data, read by peft's 4-bit LoRA layer
        for name, value in (("quant_state", state), ("quant_type", quant_type), ("blocksize", BLOCKSIZE),
                            ("compress_statistics", double_quant), ("quant_storage", torch.uint8),
                            ("bnb_quantized", True), ("module", module)):
            setattr(weight, name, value)
    else:
        with _fp32_tables():
            weight = bnb.nn.Params4bit(source, requires_grad=False, blocksize=BLOCKSIZE,
                                       compress_statistics=double_quant, quant_type=quant_type,
                                       module=module)._quantize(source.device)
        state = weight.quant_state
    module.weight = weight
    module.quant_state = state
    # bitsandbytes repacks a CPU weight for AVX512-BF16 inference the first time it runs in eval mode without
    # autograd: a layout with no backward, which would also change the weight's bytes mid-run. A trained model
    # keeps the one layout (perplexity evaluations included).
    module.support_avx512bf16_for_cpu = False
    module.bias = linear.bias
    return module
