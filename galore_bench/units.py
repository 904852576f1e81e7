"""Byte quantities as people write them ("24 GiB", "22 GB") and as reports print them."""
from __future__ import annotations

import re

# GiB (2**30) and GB (10**9) differ by 7.4%: the LOMO paper prints GiB as "GB", the GaLore paper means GB.
GIB, GB = 2**30, 10**9
# what each byte of a run counts as: the tracker labels, records store, reports and budgets read them
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "other")
_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$")
ALLOWED_UNITS = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"


def parse_bytes(text: str) -> int:
    """Parse '24 GiB' / '1.5GB' to bytes; raises ValueError naming what is allowed."""
    match = _PATTERN.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse {text!r} as a size; write a number and a unit ({ALLOWED_UNITS})")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not size < 2**63:  # 400 digits read as an infinite float; no device holds 8 EiB
        raise ValueError(f"cannot take {text!r} as a size; sizes are below 2**63 bytes (8 EiB)")
    return round(size)


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def format_bytes(n_bytes: float | None) -> str:
    """Human-readable size in binary units (what allocators and nvidia-smi report)."""
    if n_bytes is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{int(n_bytes)} B"


CUDA_BLOCK = 512  # the caching allocator rounds every block up to a multiple of 512 bytes


def allocator_bytes(nbytes: int, round_to: int = CUDA_BLOCK) -> int:
    """What an allocator that hands out multiples of `round_to` bytes takes for `nbytes` (1: exact)."""
    return -(-nbytes // round_to) * round_to if round_to > 1 else nbytes
