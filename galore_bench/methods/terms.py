"""The vocabulary of a method's estimate terms: parameter shapes, allocator rounding, and Adam's state.

`measure/estimate.py` places these bytes at the moments of a step; each `methods/<m>.py` says, in these
words, what its optimizer keeps, what its update allocates and how it changes the model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from galore_bench.models import Model, ModelShape, matrix_shapes, meta_model
from galore_bench.models.layout import projections, short_name
from galore_bench.optim.galore import BNB_BLOCKSIZE, MIN_8BIT_SIZE
from galore_bench.units import CUDA_BLOCK, allocator_bytes

Options = dict[str, Any]


def blocks(nbytes: float) -> int:
    """Bytes the caching allocator hands out for one tensor of `nbytes` (simulate rounds the same way)."""
    return allocator_bytes(int(nbytes), CUDA_BLOCK)


@dataclass(frozen=True, slots=True)
class ParamShape:
    """One parameter as the estimate sees it: its shape, whether it trains, whether GaLore projects it."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    projected: bool = False
    value_bytes: int | None = None
    """Bytes per stored weight value when not the training dtype's (Q-GaLore's int8 codes, fp32 scales)."""
    itemsize: int = 0
    """Bytes per value when the parameter has its own dtype (peft's fp32 adapters on a bf16 model); 0: the model's."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def width(self, e: int) -> int:
        """Bytes per value: its own dtype's, else the model's `e`."""
        return self.itemsize or e


MatrixLayout = Callable[[str, int, int], list[ParamShape]]


def dense(name: str, rows: int, cols: int) -> list[ParamShape]:
    """A projection matrix left as it is."""
    return [ParamShape(name, (rows, cols))]


def model_parameters(shape: Model, matrix: MatrixLayout = dense,
                     target_modules: list[str] | None = None) -> list[ParamShape]:
    """Every parameter of the model, each attention / MLP matrix as `matrix` lays it out (adapters, factors).

    Names follow the model: 'embed_tokens', 'lm_head', 'norm', then '<layer>.<module>' ('<layer>.<module>.bias').
    The zoo's are written out; any other model's are read off it on the meta device, a tied head listed once
    (as the embedding), and the matrices are its projections (or the run's target_modules).
    """
    if not isinstance(shape, ModelShape) or target_modules:
        built = meta_model(shape)
        targets = {f"{name}.weight" for name in projections(built, target_modules)}
        tensors = []
        for name, param in built.named_parameters():
            if name in targets:
                tensors += matrix(short_name(name), int(param.shape[0]), int(param.shape[1]))
            else:
                tensors.append(ParamShape(short_name(name), tuple(int(d) for d in param.shape)))
        return tensors
    h, v = shape.hidden_size, shape.vocab_size
    tensors = [ParamShape("embed_tokens", (v, h)), ParamShape("lm_head", (v, h)), ParamShape("norm", (h,))]
    for layer in range(shape.num_hidden_layers):
        tensors += [ParamShape(f"{layer}.input_layernorm", (h,)),
                    ParamShape(f"{layer}.post_attention_layernorm", (h,))]
        for name, (rows, cols) in matrix_shapes(shape).items():
            tensors += matrix(f"{layer}.{name}", rows, cols)
    return tensors


def adam_state(numel: int, e: int) -> int:
    """Two moments in the training dtype (torch AdamW, GaLore's regular parameters)."""
    return 2 * blocks(numel * e)


def adam8bit_state(numel: int) -> int:
    """Two uint8 moments + two fp32 absmax per block, or two fp32 moments below bitsandbytes' threshold."""
    if numel < MIN_8BIT_SIZE:
        return 2 * blocks(numel * 4)
    return 2 * blocks(numel) + 2 * blocks(-(-numel // BNB_BLOCKSIZE) * 4)


BNB_QUANTIZATION_MAPS = 2 * blocks(256 * 4)
"""bitsandbytes' signed and unsigned 256-entry fp32 quantization maps, one pair per optimizer."""
TORCH_STEP = blocks(4)
"""torch AdamW's fp32 `step` tensor, one per parameter."""


class Moment(NamedTuple):
    """What a method adds at one moment of the step, besides the weights and optimizer states all hold."""

    gradients: int
    activations: int
    other: int


@dataclass(frozen=True, slots=True)
class StepBytes:
    """What the estimate has counted of a step, for a method's own extra moments (GaLore's refresh)."""

    shape: Model
    params: list[ParamShape]
    options: Options
    e: int
    """Bytes per element of the training dtype."""
    gradients: int
    """Every trainable parameter's gradient."""
    head_gradient: int
    saved: int
    """Activations autograd keeps through backward."""
    layerwise: bool


def nothing(*args: Any) -> int:
    return 0


def plain_layout(shape: Model, opts: Options) -> list[ParamShape]:
    return model_parameters(shape)


def layerwise_option(opts: Options) -> bool:
    return bool(opts.get("layerwise"))


@dataclass(frozen=True, slots=True)
class EstimateTerms:
    """A method's closed-form bytes; `estimate` places them at the moments of a step (e: bytes per element)."""

    state_bytes: Callable[[ParamShape, Options, int], int] = nothing
    """What the optimizer keeps between steps for one trainable parameter."""
    shared_state_bytes: Callable[[Options], int] = nothing
    """State each optimizer object keeps once, whatever its parameters (bitsandbytes' quantization maps);
    layer-wise stepping builds one optimizer per parameter, so the method says how many copies there are."""
    update_temporaries: Callable[[ParamShape, Options, int], int] = nothing
    """The largest transient one parameter's update allocates."""
    whole_update_temporaries: Callable[[list[ParamShape], Options, int, bool, str], int | None] | None = None
    """(trainable, options, e, layer-wise, target) -> the largest transient of a whole update when the
    implementation batches parameters (foreach AdamW); None falls back to the largest per-parameter one."""
    layout: Callable[[Model, Options], list[ParamShape]] = plain_layout
    """The parameters after the method's model changes (adapters with a frozen base, factors, projected flags)."""
    saved_per_layer: Callable[[Model, int, int, Options], int] = nothing
    """(shape, tokens, e, options) -> extra activations one decoder layer saves (rank-r intermediates)."""
    saved_outside_layers: Callable[[Model, int, int, Options, bool], int] = nothing
    """(shape, tokens, e, options, checkpointing) -> what the method changes in the activations saved outside the
    decoder layers' repeated part (QLoRA's frozen final norm and head save less; negative bytes)."""
    saved_activations: Callable[[dict[str, int], Model, int, int, bool, Options], dict[str, int]] | None = None
    """(activation terms, shape, tokens, e, checkpointing, options) -> those terms as the method's frozen layers
    change them (BAdam: nothing below the active layer, less above it); None: every layer saves as it trains."""
    updates_in_backward: Callable[[Options], bool] = layerwise_option
    """Whether each weight is updated inside backward, its gradient freed at once (LOMO, layer-wise)."""
    extra_moments: Callable[[StepBytes], dict[str, Moment]] | None = None
    """Moments of the step only this method has (GaLore: the SVDs of a projector refresh)."""
    forward_only: bool = False
    """Autograd off: no gradient, no state, only the forward's transients (the inference reference)."""
    phases: Callable[[Model, Options, int, int], dict[str, Options]] | None = None
    """(shape, options, steps, seed) -> {label: options} for each phase of a run whose memory differs (BAdam: the
    blocks it trains that can hold the peak); `estimate_run` gives the largest, and simulate traces that one."""
