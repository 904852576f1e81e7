"""Throughput FLOPs and MFU: a closed-form count, a counted one, and a table of device peaks.

Two counts of one training step, kept independent so each checks the other:
- `hand_count`: matmul FLOPs from the model's dimensions, term by term (2 FLOPs per multiply-add).
- `count_step_flops`: torch.utils.flop_counter.FlopCounterMode around one real step of the method on
  fake tensors (no memory, any size, on a CPU), so method-specific matmuls (LoRA adapters, GaLore
  projections, LOMO's second backward) are seen too.
MFU uses the PaLM model-FLOPs convention (`model_flops_per_token`), not the counted FLOPs, so
recomputation (activation checkpointing, flash backward) does not raise it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from galore_bench.measure.fake_shims import one_value_draws_have_values
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.measure.training import build_trainer, forward_loss
from galore_bench.methods.precision import run_settings
from galore_bench.models import (
    Model,
    causal_mask_skipped_under_fake_tensors,
    matrix_shapes,
    parameter_count,
)
from galore_bench.spec.scenario import RunSpec, Scenario

aten = torch.ops.aten

COUNTED_WITH = "torch.utils.flop_counter.FlopCounterMode on one fake-tensor step of the method"
NOT_COUNTED = ("element-wise ops (norms, activations, optimizer updates) and linalg ops such as GaLore's SVD "
               "refresh: FlopCounterMode has formulas for matmul, convolution and attention only")
MODEL_FLOPS_FORMULA = ("PaLM (arXiv 2204.02311, App. B): 6*N + 12*L*H*Q*T per token, N = all parameters "
                       "minus the input embedding table (LM head and norm weights included, as torchtitan "
                       "counts it), L layers, H*Q = hidden size, T = sequence length; causal masking ignored")
FORWARD_MODEL_FLOPS_FORMULA = ("PaLM (arXiv 2204.02311, App. B), forward only (a third of training's): 2*N + "
                               "4*L*H*Q*T per token, N, L, H*Q, T as for training; for the inference reference")


# -- the closed-form count ------------------------------------------------------------------------
def hand_count(shape: Model, batch_size: int, seq_len: int,
               activation_checkpointing: bool = False) -> dict[str, Any]:
    """Matmul FLOPs of one training step, counted the way FlopCounterMode counts them.

    Terms (T = batch_size * seq_len tokens, h hidden, L layers, V vocab, s seq_len):
    - layer weights, forward: 2*T*L*sum(out*in) over q,k,v,o,gate,up,down;
    - LM head, forward: 2*T*h*V (the input embedding is a lookup, no matmul);
    - their backward: 2x forward (input gradient + weight gradient, every weight trainable);
    - attention, forward: scores Q K^T and P V, 2 * (2*b*s*s*h) per layer. Full s x s: the causal mask
      halves the useful work, but torch's SDPA formulas (and most MFU conventions) do not subtract it;
    - attention, backward: 5 such matmuls per layer (torch's flash backward formula: scores recomputed,
      then dP, dV, dQ, dK);
    - activation checkpointing: the decoder layers' forward again in backward (not the LM head), except
      down_proj: torch's non-reentrant checkpoint stops recomputing once the last tensor saved for
      backward is rebuilt, and down_proj's output is not saved (the layer's only matmul skipped).
    """
    h, L, s, b = shape.hidden_size, shape.num_hidden_layers, seq_len, batch_size
    tokens = b * s
    width = shape.num_attention_heads * getattr(shape, "head_dim", h // shape.num_attention_heads)  # q's width
    attention_matmul = 2 * b * s * s * width  # one s x s x (head_dim) matmul over all heads, b sequences
    terms = {
        "layer_weights_forward": 2 * tokens * L * sum(o * i for o, i in matrix_shapes(shape).values()),
        "lm_head_forward": 2 * tokens * h * shape.vocab_size,
        "attention_forward": L * 2 * attention_matmul,
        "attention_backward": L * 5 * attention_matmul,
    }
    forward = terms["layer_weights_forward"] + terms["lm_head_forward"] + terms["attention_forward"]
    backward = 2 * (terms["layer_weights_forward"] + terms["lm_head_forward"]) + terms["attention_backward"]
    down_proj = 2 * tokens * L * h * shape.intermediate_size
    recompute = (terms["layer_weights_forward"] - down_proj + terms["attention_forward"]
                 if activation_checkpointing else 0)
    total = forward + backward + recompute
    # the input embedding is a lookup; a tied one is also the LM head, which does multiply
    n_mfu = parameter_count(shape) - (0 if getattr(shape, "tie_word_embeddings", False) else shape.vocab_size * h)
    model_per_token = 6 * n_mfu + 12 * L * h * s
    return {"tokens": tokens, "terms": terms, "forward": forward, "backward": backward, "recompute": recompute,
            "flops_per_step": total, "flops_per_token": total / tokens,
            "model_flops_per_token": model_per_token, "model_flops_per_step": model_per_token * tokens,
            "model_flops_params": n_mfu, "model_flops_formula": MODEL_FLOPS_FORMULA}


# -- the counted step -----------------------------------------------------------------------------
def _sdpa_cpu_forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's registry covers the CUDA SDPA kernels (flash, efficient, cudnn) but not the CPU flash kernel
# that transformers' "sdpa" attention runs on CPU (and on fake CPU tensors): without these two entries
# attention counts zero. Same formulas as the CUDA kernels, so CPU and GPU counts agree.
CPU_ATTENTION_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


def flop_counter_mode() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)


def count_step_flops(scenario: Scenario, run: RunSpec) -> dict[str, Any]:
    """FLOPs of one real training step of the run's method (all micro-batches and the update), fake tensors.

    The model and optimizer are built outside the counter, so only the step is counted; the step is the
    method's own Trainer.backward/update, as the engines run it.
    """
    train = run_settings(scenario.train, run.options)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    trainer = build_trainer(scenario, run, "cpu", MemoryTracker(), fake_mode)
    with fake_mode, causal_mask_skipped_under_fake_tensors(), one_value_draws_have_values(True):
        batch = torch.randint(0, run.model.vocab_size, (train.batch_size, train.seq_len))
        with flop_counter_mode() as counter:
            for _ in range(train.grad_accum):
                with torch.set_grad_enabled(trainer.grad_enabled):
                    loss = forward_loss(trainer.model, batch, train)
                trainer.backward(loss / train.grad_accum if train.grad_accum > 1 else loss)
                del loss
            trainer.update(0)
    total = counter.get_total_flops()
    tokens = train.batch_size * train.seq_len * train.grad_accum
    by_operator = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops_per_step": int(total), "flops_per_token": total / tokens, "by_operator": by_operator,
            "counted_with": COUNTED_WITH, "not_counted": NOT_COUNTED}


# -- device peaks and MFU -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DevicePeak:
    """Dense (no structured sparsity) peak FLOP/s of one device, per training dtype, with its source."""

    bf16: float | None
    fp16: float | None
    fp32: float | None
    source: str
    note: str = ""
    """Why a dtype is None, or how a figure was derived."""


_FP32_NOTE = "fp32 = non-tensor-core FP32 (PyTorch leaves TF32 matmuls off by default)"
_HALVED = "the datasheet's BF16/FP16 figure is with 2:4 sparsity; dense = half"
# First match wins (re.search, case-insensitive) on torch.cuda.get_device_name() with spaces -> '-'.
PEAK_FLOPS: dict[str, DevicePeak] = {
    r"H100.*NVL": DevicePeak(835.5e12, 835.5e12, 60e12, "NVIDIA H100 NVL product brief (BF16 1,671 TFLOPS sparse)",
                             f"{_HALVED}; {_FP32_NOTE}"),
    r"H100.*PCIe": DevicePeak(756e12, 756e12, 51e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column",
                              f"{_HALVED} (1,513); {_FP32_NOTE}"),
    r"H100.*(SXM|HBM3)": DevicePeak(989.4e12, 989.4e12, 67e12,
                                    "NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5 dense BF16",
                                    f"datasheet prints 1,979 TFLOPS with sparsity; {_FP32_NOTE}"),
    r"H200.*NVL": DevicePeak(835.5e12, 835.5e12, 60e12, "NVIDIA H200 datasheet, H200 NVL column (1,671 sparse)",
                             f"{_HALVED}; {_FP32_NOTE}"),
    r"H200": DevicePeak(989.5e12, 989.5e12, 67e12, "NVIDIA H200 datasheet, H200 SXM column (1,979 sparse)",
                        f"{_HALVED}; {_FP32_NOTE}"),
    r"A100": DevicePeak(312e12, 312e12, 19.5e12, "NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike)",
                        f"dense BF16/FP16 tensor core; {_FP32_NOTE}"),
    r"RTX-4090$": DevicePeak(165.2e12, 165.2e12, 82.6e12,
                             "NVIDIA Ada Lovelace GPU Architecture whitepaper, GeForce RTX 4090",
                             "FP16/BF16 tensor with FP32 accumulate (what PyTorch uses); 330.3 with FP16 "
                             f"accumulate; {_FP32_NOTE}"),
    r"RTX-3090$": DevicePeak(71e12, 71e12, 35.6e12, "NVIDIA Ampere GA102 GPU Architecture whitepaper, RTX 3090",
                             f"FP16/BF16 tensor with FP32 accumulate; 142 with FP16 accumulate; {_FP32_NOTE}"),
    r"L4$": DevicePeak(121e12, 121e12, 30.3e12, "NVIDIA L4 Tensor Core GPU datasheet (BF16 242 TFLOPS sparse)",
                       f"{_HALVED}; {_FP32_NOTE}"),
    r"A10$": DevicePeak(125e12, 125e12, 31.2e12, "NVIDIA A10 Tensor Core GPU datasheet (BF16 250 TFLOPS sparse)",
                        f"{_HALVED}; {_FP32_NOTE}"),
    r"A10G": DevicePeak(None, None, None, "none",
                        "AWS's A10G variant: NVIDIA publishes no datasheet figures for it"),
    r"V100-SXM2": DevicePeak(None, 125e12, 15.7e12, "NVIDIA Tesla V100 datasheet, SXM2 (tensor 125 TFLOPS)",
                             "Volta has no BF16 tensor cores; " + _FP32_NOTE),
    r"V100-PCIE": DevicePeak(None, 112e12, 14e12, "NVIDIA Tesla V100 datasheet, PCIe (tensor 112 TFLOPS)",
                             "Volta has no BF16 tensor cores; " + _FP32_NOTE),
}
CPU_REASON = "no peak FLOP/s table entry for CPUs: MFU not computed"


def peak_flops(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, source) for a device and training dtype, or (None, why not)."""
    if device_name.lower() == "cpu":
        return None, CPU_REASON
    if dtype not in ("bf16", "fp16", "fp32"):
        return None, f"no peak FLOP/s for dtype {dtype!r} (known: bf16, fp16, fp32): MFU not computed"
    for pattern, entry in PEAK_FLOPS.items():
        if re.search(pattern, device_name, re.IGNORECASE):
            peak = getattr(entry, dtype)
            if peak is None:
                return None, f"{device_name}: no {dtype} peak ({entry.note}): MFU not computed"
            return peak, f"{entry.source}; {entry.note}" if entry.note else entry.source
    return None, f"no peak FLOP/s table entry for {device_name!r}: MFU not computed"


def mfu(flops_per_step: float, step_seconds: float, device_name: str, dtype: str) -> dict[str, Any]:
    """Achieved FLOP/s over the device's dense peak. Pass model FLOPs (PaLM) per step for MFU proper."""
    achieved = flops_per_step / step_seconds if step_seconds > 0 else None
    peak, source = peak_flops(device_name, dtype)
    ratio = achieved / peak if (achieved is not None and peak) else None
    return {"mfu": ratio, "peak_flops": peak, "peak_source": source, "achieved_flops_per_second": achieved}
