"""Single transformers modules, forward + backward, traced on fake tensors as Liger-Kernel's benchmarks measure them.

Liger-Kernel's benchmark scripts (github.com/linkedin/Liger-Kernel, benchmark/scripts/benchmark_<name>.py)
publish `torch.cuda.max_memory_allocated()` for one module's forward + backward at exact shapes, read after
`reset_peak_memory_stats()` with the inputs, the modules' weights and (from the second iteration on) the
gradients of earlier iterations resident; the median of 10 iterations is the steady state. Each setup below
builds what its script builds (both providers' modules where the script creates both) and runs its `full()`;
`traced_peak` replays that under FakeTensorMode with the suite's tracker, sizes rounded to the CUDA caching
allocator's 512-byte blocks, and returns the last iteration's peak. No GPU and no Liger-Kernel are needed: only
the "huggingface"/"torch" provider's code (transformers' and torch's modules) is traced.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from galore_bench.measure.tracker import MemoryTracker
from galore_bench.models import default_dtype
from galore_bench.units import CUDA_BLOCK

Step = Callable[[], None]
DTYPE_NAMES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def _dtype(config: dict[str, Any]) -> torch.dtype:
    return DTYPE_NAMES[config.get("dtype", "torch.float32")]


def cross_entropy(config: dict[str, Any], vocab: int) -> Step:
    """benchmark_cross_entropy.py: fp32 logits (B*T, V) requiring grad, torch's CrossEntropyLoss, backward."""
    tokens = config["B"] * config["T"]
    logits = torch.randn(tokens, vocab, requires_grad=True)
    target = torch.randint(vocab, (tokens, 1)).squeeze(1)
    loss_fn = torch.nn.CrossEntropyLoss()

    def full() -> None:
        loss_fn(logits, target).backward()

    return full


def fused_linear_cross_entropy(config: dict[str, Any], tokens: int) -> Step:
    """benchmark_fused_linear_cross_entropy.py: an LM head (H -> V, no bias) then torch's CrossEntropyLoss. The
    script builds the Liger module too (a second V x H weight, resident though unused by this provider)."""
    hidden, vocab, dtype = config["H"], config["V"], _dtype(config)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    _liger_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    x = torch.randn(tokens, hidden, requires_grad=True, dtype=dtype)
    target = torch.randint(vocab, (tokens, 1), dtype=torch.long).squeeze(1)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="mean")

    def full() -> None:
        loss_fn(head(x), target).backward()

    full.keep = _liger_head  # type: ignore[attr-defined]
    return full


def rms_norm(config: dict[str, Any], hidden: int) -> Step:
    """benchmark_rms_norm.py: LlamaRMSNorm (fp32 weight: the script moves it without a dtype) on (M, H); the
    Liger module's fp32 weight is resident too; backward with a random gradient of the input's dtype."""
    dtype = _dtype(config)
    norm = LlamaRMSNorm(hidden, eps=config["eps"])
    _liger_weight = torch.ones(hidden)  # LigerRMSNorm's weight, resident
    x = torch.randn(config["M"], hidden, dtype=dtype)
    dy = torch.randn_like(x)
    x.requires_grad_(True)

    def full() -> None:
        norm(x).backward(dy, retain_graph=True)

    full.keep = _liger_weight  # type: ignore[attr-defined]
    return full


def swiglu(config: dict[str, Any], seq_len: int) -> Step:
    """benchmark_swiglu.py: LlamaMLP in the run's dtype on (B, T, hidden); backward with a random gradient."""
    dtype = _dtype(config)
    llama = LlamaConfig(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                        hidden_act=config["hidden_act"])
    with default_dtype(dtype):  # built in its dtype: .to() cannot swap fake parameters
        layer = LlamaMLP(llama)
    x = torch.randn(config["B"], seq_len, config["hidden_size"], dtype=dtype, requires_grad=True)

    def full() -> None:
        y = layer(x)
        y.backward(torch.randn_like(y), retain_graph=True)

    return full


def rope(config: dict[str, Any], x: int, x_name: str) -> Step:
    """benchmark_rope.py: transformers' apply_rotary_pos_emb on q (1, heads, T, d) and k (1, kv heads, T, d)
    (transposed views of (1, T, heads, d) tensors), cos/sin from LlamaRotaryEmbedding made before the reset;
    torch.autograd.grad of both outputs with random gradients. x is the hidden size or the sequence length."""
    dtype = _dtype(config)
    hidden = config.get("hidden_size", x if x_name == "H" else 0)
    seq_len = config.get("seq_len", x if x_name == "T" else 0)
    heads, kv_heads = config["num_q_heads"], config["num_kv_heads"]
    head_dim = hidden // heads
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=hidden, num_attention_heads=heads,
                                              num_key_value_heads=kv_heads, head_dim=head_dim))
    # transformers of the script's time (>= 4.42) formed the angles as a matmul (inv_freq as a column times
    # the positions as a row), today's as an elementwise product: the same cos/sin, but a GEMM before the reset
    # (a cuBLAS workspace on a GPU). Issued here so the trace sees the GEMM the benchmark's process ran.
    torch.matmul(rotary.inv_freq[None, :, None].float(), torch.ones(1, 1, seq_len))
    q = torch.randn(1, seq_len, heads, head_dim, requires_grad=True, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, seq_len, kv_heads, head_dim, requires_grad=True, dtype=dtype).transpose(1, 2)
    dq, dk = torch.randn_like(q, dtype=dtype), torch.randn_like(k)
    positions = torch.arange(seq_len, dtype=torch.long).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(k, positions)

    def full() -> None:
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
        torch.autograd.grad((q_out, k_out), (q, k), (dq, dk), allow_unused=True, retain_graph=True)

    return full


SETUPS: dict[str, Callable[[dict[str, Any], int, str], Step]] = {
    "cross_entropy": lambda config, x, _: cross_entropy(config, x),
    "fused_linear_cross_entropy": lambda config, x, _: fused_linear_cross_entropy(config, x),
    "rms_norm": lambda config, x, _: rms_norm(config, x),
    "swiglu": lambda config, x, _: swiglu(config, x),
    "rope": rope,
}


GEMMS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_addmm_activation"}


class GemmContexts(TorchDispatchMode):
    """Which contexts issue a GEMM: outside autograd's backward (the caller's thread) and inside it (on a GPU,
    autograd's own device thread). torch gives each thread its own cuBLAS handle, and each handle a workspace
    taken from the caching allocator at its first GEMM and kept: counted by max_memory_allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func.overloadpacket.__name__ in GEMMS:
            self.contexts.add("backward" if torch._C._current_graph_task_id() != -1 else "caller")
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True, slots=True)
class TracedModule:
    peak_bytes: int
    """The last iteration's peak: inputs, weights, earlier gradients and this iteration's tensors."""
    gemm_contexts: tuple[str, ...]
    """Threads that issued a GEMM ("caller", "backward"): one cuBLAS workspace each on a GPU."""


def traced_peak(module: str, config: dict[str, Any], x_value: int, x_name: str, iterations: int = 2) -> TracedModule:
    """Peak bytes of `iterations` runs of the module's forward + backward, the peak reset before each (the
    last is returned: gradients of the earlier ones resident, as in the benchmark's steady state)."""
    tracker, gemms = MemoryTracker(round_to=CUDA_BLOCK), GemmContexts()
    with FakeTensorMode(), tracker, gemms:
        full = SETUPS[module](config, x_value, x_name)
        for _ in range(iterations):
            tracker.reset_peak()
            full()
    return TracedModule(tracker.peak, tuple(sorted(gemms.contexts)))
