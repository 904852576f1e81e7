"""The models: the LLaMA-1 zoo (ModelShape), and any transformers decoder given by a config or a preset (HFModel).

Both are frozen descriptions; `build_model` builds either in its training dtype on any device (real, meta, or
under fake tensors), and the functions here answer the engines' questions about either kind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel, masking_utils

from galore_bench.errors import UserError
from galore_bench.models.hf import HFModel, preset_names
from galore_bench.models.layout import layer_projection_shapes, meta_parameter_count
from galore_bench.models.zoo import GALORE_CONFIGS, ZOO, ModelShape, zoo_matrix_shapes, zoo_parameter_count

Model = ModelShape | HFModel
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matrix_shapes(shape: Model, target_modules: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection in one decoder layer: the matrices GaLore/LoRA act on (all, or the targets)."""
    if isinstance(shape, ModelShape) and not target_modules:
        return zoo_matrix_shapes(shape)
    return layer_projection_shapes(meta_model(shape), target_modules)


def parameter_count(shape: Model) -> int:
    """The zoo's closed form; an HFModel's count from its model built on the meta device (each tensor once)."""
    if isinstance(shape, ModelShape):
        return zoo_parameter_count(shape)
    return meta_parameter_count(meta_model(shape))


def model_record(shape: Model) -> dict[str, Any]:
    """What a record keeps of the model: the zoo's fields as they always were, an HFModel's preset, source, config."""
    return dataclasses.asdict(shape) if isinstance(shape, ModelShape) else shape.describe()


@functools.lru_cache(maxsize=8)
def meta_model(shape: Model) -> nn.Module:
    """The model on the meta device (no memory), for its parameter names and shapes; shared, never trained.

    Built with eager attention: the parameters are the same whatever kernel runs, and a flash-attention run is
    described on a machine without the package too."""
    if isinstance(shape, HFModel):
        shape = dataclasses.replace(shape, attn_implementation="eager")
    return build_model(shape, "bf16", "meta")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _flash_attention_problem(device: str | torch.device) -> str | None:
    on_fake_or_cpu = torch.device(device).type != "cuda"
    if on_fake_or_cpu or not torch.cuda.is_available():
        return "flash_attention_2 runs on a CUDA GPU only (measure mode on a GPU): use sdpa or eager here"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attention_2 needs the flash-attn package installed: use sdpa or eager"
    return None


def build_model(shape: Model, dtype: str, device: str | torch.device = "cpu", seed: int = 0) -> PreTrainedModel:
    """Build the model directly in its training dtype on `device`.

    Built in the target dtype rather than cast with .to(): casting fails under fake-tensor mode and
    would briefly hold two copies of the weights on a real device.
    """
    torch.manual_seed(seed)
    config = shape.config()
    model: PreTrainedModel
    if isinstance(shape, HFModel) and shape.attn_implementation == "flash_attention_2" and str(device) != "meta":
        problem = _flash_attention_problem(device)
        if problem is not None:
            raise UserError(f"model.attn_implementation: {problem}")
    with default_dtype(DTYPES[dtype]), torch.device(device):
        if isinstance(shape, ModelShape):
            model = LlamaForCausalLM(shape.config())
        else:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=shape.attn_implementation)
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def causal_mask_skipped_under_fake_tensors():
    """Let transformers skip the b x 1 x s x s causal mask under fake tensors, as a real step does.

    A real step reads its position ids, finds one unpacked sequence per row, and calls SDPA with
    is_causal and no mask. Fake tensors have no values to read, so transformers plays safe and builds
    the full mask: memory and time that the run being predicted never spends. Our batches never pack
    sequences (the model numbers positions itself), so None is what the probe answers on real data.
    """
    probe = masking_utils.find_packed_sequence_indices

    def packed_sequences(position_ids: torch.Tensor) -> torch.Tensor | None:
        return None if isinstance(position_ids, FakeTensor) else probe(position_ids)

    masking_utils.find_packed_sequence_indices = packed_sequences
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = probe


__all__ = ["DTYPES", "GALORE_CONFIGS", "ZOO", "HFModel", "Model", "ModelShape", "build_model",
           "causal_mask_skipped_under_fake_tensors", "default_dtype", "matrix_shapes", "meta_model", "model_record",
           "parameter_count", "preset_names"]
