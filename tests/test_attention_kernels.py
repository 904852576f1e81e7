"""What simulate traces for sdpa (the CPU flash kernel on fake CPU tensors) against what the GPU's kernels keep.

No GPU here: the CUDA kernels' outputs come from their meta registrations, run on fake CUDA tensors (the shapes
and dtypes torch allocates for them). The check says how far a CPU simulation is from a GPU step's attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from galore_bench.units import CUDA_BLOCK, allocator_bytes

B, HEADS, KV_HEADS, S, D = 2, 8, 2, 50, 32
aten = torch.ops.aten


def _saved_by_cpu_sdpa() -> list[torch.Tensor]:
    """The tensors autograd keeps for transformers' sdpa call (GQA without repeating k/v: enable_gqa)."""
    saved: list[torch.Tensor] = []
    with FakeTensorMode():
        q = torch.randn(B, HEADS, S, D, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, KV_HEADS, S, D, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, KV_HEADS, S, D, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert type(out.grad_fn).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"
    return saved


def test_simulated_sdpa_keeps_q_unrepeated_k_v_the_output_and_an_fp32_logsumexp():
    shapes = sorted((tuple(t.shape), t.dtype) for t in _saved_by_cpu_sdpa())
    assert shapes == sorted([((B, HEADS, S, D), torch.bfloat16), ((B, KV_HEADS, S, D), torch.bfloat16),
                             ((B, KV_HEADS, S, D), torch.bfloat16), ((B, HEADS, S, D), torch.bfloat16),
                             ((B, HEADS, S), torch.float32)])


def _cuda_outputs(kernel: str) -> list[torch.Tensor]:
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(B, HEADS, S, D, dtype=torch.bfloat16, device="cuda")
        calls = {"flash": lambda: aten._scaled_dot_product_flash_attention(q, q, q, 0.0, True),
                 "efficient": lambda: aten._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0, True),
                 "cudnn": lambda: aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, True)}
        return [o for o in calls[kernel]() if isinstance(o, torch.Tensor)]


def _bytes(t: torch.Tensor) -> int:
    return allocator_bytes(t.numel() * t.element_size(), CUDA_BLOCK)


def test_gpu_kernels_keep_the_same_logsumexp_plus_at_most_1_kib_of_rng_state_per_layer():
    """Flash (the H100/A100 default for bf16) and cuDNN keep a logsumexp of the CPU kernel's size; the
    memory-efficient kernel pads it to 32 positions; each also keeps a philox seed and offset (two blocks)."""
    cpu_lse = next(t for t in _saved_by_cpu_sdpa() if t.dtype == torch.float32)
    for kernel in ("flash", "efficient", "cudnn"):
        out, lse, *rest = _cuda_outputs(kernel)
        assert out.shape == (B, HEADS, S, D) and lse.dtype == torch.float32
        padded = -(-S // 32) * 32 if kernel == "efficient" else S
        assert lse.numel() == B * HEADS * padded
        extra = sum(_bytes(t) for t in rest)
        assert extra <= 2 * CUDA_BLOCK, (kernel, [tuple(t.shape) for t in rest])  # what simulate does not see
        if kernel != "efficient":
            assert _bytes(lse) == _bytes(cpu_lse)
