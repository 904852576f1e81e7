"""The simulate and measure engines: real training steps of the real method code, with the tracker on.

simulate runs them on fake tensors (no memory, any model size, on a CPU); measure runs them on the
real device. Both report the peak of the steady state (steps 2+), once optimizer states exist.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from galore_bench import data, data_bytes
from galore_bench.chunked_loss import chunked_loss
from galore_bench.measure import fake_shims
from galore_bench.measure.estimate import EstimateUnavailable, peak_phase
from galore_bench.measure.timing import StepTimer
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods import REGISTRY, Trainer, TrainSettings, precision
from galore_bench.model_dtype_loss import model_dtype_cross_entropy
from galore_bench.models import DTYPES, build_model, causal_mask_skipped_under_fake_tensors, default_dtype
from galore_bench.optim.group_schedule import GroupSchedule
from galore_bench.optim.relora import warmup_cosine_lr
from galore_bench.spec.scenario import RunSpec, Scenario
from galore_bench.units import CUDA_BLOCK

ProgressFn = Callable[[int, int], None]
EvaluateFn = Callable[[torch.nn.Module], dict[str, Any]]
SIMULATE_STEPS = 2  # step 1 creates optimizer states; step 2 is the steady state we report


def simulation_plan(scenario: Scenario, run: RunSpec) -> tuple[RunSpec, int]:
    """The run and step count a simulation traces: two steps, and one more when the method has a periodic cost
    (its trace plan; GaLore's projector refresh), so that cost's transients belong in the peak. A method whose
    memory changes along the run (BAdam's blocks) is traced in the phase the estimate finds largest."""
    run = largest_phase(scenario, run)
    plan = REGISTRY[run.method].trace_plan
    if plan is not None:
        return dataclasses.replace(run, options=plan.options(run.options)), SIMULATE_STEPS + 1
    return run, SIMULATE_STEPS


def largest_phase(scenario: Scenario, run: RunSpec) -> RunSpec:
    """The run held in its largest phase (terms.phases: BAdam's block with the most memory among those it trains),
    else the run itself; without a closed form for the model (Gemma-2, MoE) the run as it starts."""
    terms = REGISTRY[run.method].estimate
    if terms is None or terms.phases is None:
        return run
    try:
        found = peak_phase(scenario, run)
    except EstimateUnavailable:
        return run
    return run if found is None else dataclasses.replace(run, options=found[1])


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        # a folder name: every run of spaces, slashes or other characters outside the safe set becomes one '-'
        return re.sub(r"[^A-Za-z0-9._+=@-]+", "-", torch.cuda.get_device_name()).strip("-") or "cuda"
    return "cpu"


def record_device(mode: str, device: str) -> str:
    """The record's device: the real one when measured, else 'simulated-<host>' / 'estimated-<host>'."""
    return device_name(device) if mode == "measure" else f"{mode}d-{device_name(device)}"


def input_batches(scenario: Scenario, run: RunSpec, device: str, fake: bool) -> Iterator[torch.Tensor]:
    """Token batches: shape-only under fake tensors, learnable data for real steps.

    The data set is built here, before the tracker starts: host-side data is not the step's memory
    (only each batch is, as it is drawn).
    """
    train, vocab = scenario.train, run.model.vocab_size
    if fake:
        return (torch.randint(0, vocab, (train.batch_size, train.seq_len), device=device) for _ in itertools.count())
    return (batch.to(device) for batch in training_batches(scenario, vocab).forever())


def held_out_splits(source: str) -> tuple[str, str]:
    """(split evaluated during training and chosen on, split of the final figures): the byte-level text keeps
    them apart (data_bytes.py); the others have one validation split for both."""
    return ("tune", "test") if source == "wiki-bytes" else ("validation", "validation")


def training_batches(scenario: Scenario, vocab_size: int, split: str = "train", seed_offset: int = 0):
    """The scenario's data: learnable synthetic tokens (labelled so), the offline Wikipedia corpus as 32k-vocabulary
    tokens or as bytes."""
    train = scenario.train
    if scenario.data == "wiki-bytes":
        return data_bytes.batches(split, train.seq_len, train.batch_size, seed=train.seed + seed_offset)
    if scenario.data == "wiki":
        return data.TokenBatches.from_corpus(split, train.seq_len, train.batch_size, seed=train.seed + seed_offset)
    n_batches = max(8, train.steps * train.grad_accum)
    return data.synthetic_batches(vocab_size, train.batch_size, train.seq_len,
                                  seed=train.seed + seed_offset + (1000 if split != "train" else 0),
                                  n_batches=n_batches)


def nvml_used_bytes() -> int | None:
    """What the driver says the device has in use (every process, the CUDA context included); None without NVML."""
    try:
        import pynvml  # from nvidia-ml-py

        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        pynvml.nvmlInit()
        try:  # by UUID: NVML ignores CUDA_VISIBLE_DEVICES, so torch's index may name another GPU
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library, a virtualised device: the reading is absent
        return None


def build_trainer(scenario: Scenario, run: RunSpec, device: str | torch.device, tracker: MemoryTracker,
                  fake_mode: FakeTensorMode | None,
                  wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Trainer:
    """Model, then the method's model changes, then `wrap` (DDP, FSDP2), then the tracker's hooks and the optimizer.

    The optimizer and the tracker see the wrapped module's own parameters; the trainer runs the wrapper.
    """
    method = REGISTRY[run.method]
    mode = fake_mode if fake_mode is not None else contextlib.nullcontext()
    settings = precision.run_settings(scenario.train, run.options)  # dtype: the weights' dtype of its precision
    with mode:
        llama = build_model(run.model, settings.dtype, device, seed=settings.seed)
        if settings.activation_checkpointing:
            enable_checkpointing(llama)
        model: torch.nn.Module = llama
        if method.prepare is not None:  # new modules (adapters, factors) are created in the training dtype
            with default_dtype(DTYPES[settings.dtype]), fake_shims.moves_in_place_are_noops(fake_mode is not None):
                model = method.prepare(model, run.options, settings)
        model.train()
        wrapped = wrap(model) if wrap is not None else model
        inner = getattr(wrapped, "module", wrapped)  # DDP keeps the model as .module; FSDP2 is the model itself
        tracker.watch_model(inner)
        trainer = precision.apply(method.build(inner, run.options, settings), settings, run.options)
        trainer.model = wrapped
    train = scenario.train
    # a forward-only run has nothing to schedule
    if train.lr_schedule == "cosine" and trainer.scheduler is None and trainer.optimizer is not None:
        trainer.scheduler = lr_schedule(trainer, train)
    return trainer


def lr_schedule(trainer: Trainer, train: TrainSettings) -> Any:
    """Warm-up then cosine: torch's LambdaLR for one torch optimizer, else a GroupSchedule over every group the
    trainer updates with (layer-wise: one optimizer per parameter; INT8 weights: their own stepper)."""
    def factor(step: int) -> float:
        return warmup_cosine_lr(step, max(train.steps, 1), train.warmup_steps)
    if isinstance(trainer.optimizer, torch.optim.Optimizer):
        return torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, factor)
    return GroupSchedule(trainer.lr_groups(), factor)


def enable_checkpointing(llama: Any) -> None:
    """Non-reentrant activation checkpointing per decoder layer (transformers 5 renamed the switch)."""
    if hasattr(llama, "activation_checkpointing_enable"):
        llama.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_steps(scenario: Scenario, run: RunSpec, *, fake: bool, device: str | torch.device, steps: int,
                progress: ProgressFn | None = None, round_to: int | None = None,
                evaluate: EvaluateFn | None = None, evaluate_every: int = 0,
                tracker: MemoryTracker | None = None, wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                batches: Iterator[torch.Tensor] | None = None, steady_from: int = 1,
                on_built: Callable[[Trainer], None] | None = None, track_steps: int | None = None) -> dict[str, Any]:
    """Run `steps` real training steps and return what was measured (memory, losses, step times).

    Storage sizes are rounded like the CUDA caching allocator when simulating (the GPU is what a
    simulation predicts) or measuring on CUDA; `round_to` overrides that (1 = exact bytes). A simulation's
    tracker also keeps the allocation/free sequence, for the caching-allocator model (allocator.replay).
    `evaluate(model)` runs every `evaluate_every` steps with the tracker paused (not part of the step).
    Distributed runs pass their own `tracker`, the `wrap`per (DDP, FSDP2), each rank's `batches` and the step
    their steady state starts at; `on_built(trainer)` sees the trainer before the first step.
    `track_steps`: only the first n steps run under the tracker (memory); the rest run without it, so their
    times are the step's own and not the tracker's Python dispatch (`tracked_steps` says which were tracked).
    """
    on_cuda = torch.device(device).type == "cuda"
    if tracker is None:
        tracker = MemoryTracker(round_to=round_to or (CUDA_BLOCK if (fake or on_cuda) else 1),
                                device_type="cuda" if on_cuda and not fake else None, record_events=fake)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else None
    trainer = build_trainer(scenario, run, device, tracker, fake_mode, wrap=wrap)
    settings = precision.run_settings(scenario.train, run.options)  # its own loss path, if it sets one
    if on_built is not None:
        on_built(trainer)
    batches = batches if batches is not None else input_batches(scenario, run, str(device), fake)
    timer, losses, evals, step_peaks = StepTimer(torch.device(device).type), [], [], list[int]()
    cuda_peak: dict[str, Any] = {}
    mode = fake_mode if fake_mode is not None else contextlib.nullcontext()
    tracked_steps = list(range(steps if track_steps is None else min(track_steps, steps)))
    with (mode, causal_mask_skipped_under_fake_tensors(), fake_shims.one_value_draws_have_values(fake),
          contextlib.ExitStack() as tracking):
        tracking.enter_context(tracker)
        tracking.callback(tracker.unwatch)  # untracked steps must not label (and so count) new gradients
        for step in range(steps):
            if step == len(tracked_steps):
                tracking.close()
            if step == min(steady_from, steps - 1):
                tracker.reset_peak()
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
            with timer:
                step_loss = one_step(trainer, tracker, batches, settings, step)
            if step in tracked_steps:
                tracker.label(trainer.state_tensors(), "optimizer_states")
            step_peaks.append(tracker.peak)
            if not fake:
                losses.append(step_loss)
            if evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 and step + 1 < steps:
                with _disable_current_modes():
                    evals.append({"step": step + 1, **evaluate(trainer.model)})
            if progress is not None:
                progress(step + 1, steps)
    if on_cuda:
        stats = torch.cuda.memory_stats(device)
        cuda_peak = {"allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
                     "reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
                     "num_ooms": stats.get("num_ooms", 0), "num_alloc_retries": stats.get("num_alloc_retries", 0),
                     "nvml_used_bytes_after": nvml_used_bytes()}
    tracker.unwatch()
    return {"tracker": tracker, "losses": losses, "step_times": timer.times, "cuda": cuda_peak,
            "trainer_info": trainer.info, "model": trainer.model, "evals": evals, "trainer": trainer,
            "step_peaks": step_peaks, "tracked_steps": tracked_steps,
            "device_type": "fake" if fake else torch.device(device).type}


def forward_loss(model: torch.nn.Module, batch: torch.Tensor, train: TrainSettings) -> torch.Tensor:
    """The causal-LM loss of one micro-batch, by the run's loss path: transformers' own (every token's logits at
    once, upcast to fp32), the chunked one (chunked_loss.py: `loss_chunk_tokens` tokens' logits at a time) or the
    LOMO paper's (model_dtype_loss.py: the model returns its logits, the loss is computed on them without upcast)."""
    if train.loss == "model-dtype":
        return model_dtype_cross_entropy(model(input_ids=batch, use_cache=False).logits, batch)
    if train.loss == "chunked":
        with chunked_loss(model, train.loss_chunk_tokens):
            return model(input_ids=batch, labels=batch, use_cache=False).loss
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def one_step(trainer: Trainer, tracker: MemoryTracker, batches: Iterator[torch.Tensor], train: TrainSettings,
              step: int) -> float | None:
    total: torch.Tensor | None = None
    grad_accum = train.grad_accum
    for _ in range(grad_accum):
        with tracker.phase("data"):
            batch = next(batches)
        with tracker.phase("forward"), torch.set_grad_enabled(trainer.grad_enabled), trainer.forward_context():
            loss = forward_loss(trainer.model, batch, train)
            scaled = loss / grad_accum if grad_accum > 1 else loss
        with tracker.phase("backward"):
            trainer.backward(scaled)
        detached = loss.detach()
        total = detached if total is None else total + detached
        del loss, scaled
    with tracker.phase("optimizer"):
        trainer.update(step)
    if total is None or isinstance(total, torch._subclasses.fake_tensor.FakeTensor):
        return None
    return float(total) / grad_accum
