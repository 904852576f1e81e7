"""A transformers `TrainerCallback` that writes a galore-bench record of the user's own Trainer run.

Why the measure engine's tracker and not a second instrument: a record from the user's Trainer is only worth
having if it can be set beside `galore-bench run --mode measure` of the same recipe (import-hf) and differ only
where the two loops really differ. So the callback drives the same MemoryTracker the same way training.py does:
weights labelled before the first step, each gradient labelled when autograd stores it, whatever the forward
creates counted as activations, the optimizer's state labelled after each step, the peak taken over the steady
state (from step 2 on, once the states exist) of the first `track_steps` steps; the later steps run without the
tracker and give the throughput. On a CPU the reading is the tracker's exact bytes (no caching allocator to ask);
on CUDA the allocator's own counters, as in measure.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GaloreBenchCallback("results/")])
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainerCallback

from galore_bench import store
from galore_bench.integrations import hf_args
from galore_bench.measure import training
from galore_bench.measure.timing import StepTimer, throughput
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods import Trainer
from galore_bench.record import RunRecord
from galore_bench.run import assemble
from galore_bench.spec.scenario import Scenario, load_scenario
from galore_bench.units import CUDA_BLOCK

SOURCE = "tracker, in a transformers Trainer run (galore_bench.integrations.hf_trainer)"


def optimizer_state_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """What the Trainer's optimizer keeps between steps: its `state` (through accelerate's wrapper), or, for a
    layer-wise optimizer (transformers' LayerWiseDummyOptimizer), the state of each per-parameter optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    per_parameter = getattr(inner, "optimizer_dict", None)
    for each in (per_parameter.values() if isinstance(per_parameter, dict) else [inner]):
        yield from Trainer(torch.nn.Module(), each).state_tensors()
        for state in getattr(each, "state", {}).values():  # objects kept in the state: galore-torch's projector
            for value in (state.values() if isinstance(state, dict) else []):
                if not isinstance(value, (torch.Tensor, dict, list, tuple)) and hasattr(value, "__dict__"):
                    yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))


class GaloreBenchCallback(TrainerCallback):
    """Writes one record under `out` when training ends. `scenario`: the imported scenario (a .toml path) the
    run follows, so the record carries its name and run; without it the scenario is made from the Trainer's
    TrainingArguments and the model's config (import-hf's mapping) with the batch shape the model was given."""

    def __init__(self, out: str | Path, scenario: str | Path | None = None, name: str = "hf_trainer",
                 track_steps: int = 2) -> None:
        self.out, self.scenario_path, self.name = Path(out), scenario, name
        self.track_steps = max(track_steps, 2)  # step 1 creates the states, step 2 is the steady peak
        self.record_path: Path | None = None
        self.tracker: MemoryTracker | None = None
        self._phase = contextlib.ExitStack()
        self._hooks: list[Any] = []
        self._timer: StepTimer | None = None
        self._batch: tuple[int, int] | None = None
        self._losses: list[float] = []
        self._cuda: dict[str, Any] = {}
        self._started = 0.0
        self._tracking = False

    # -- the tracked window ------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._started = time.perf_counter()
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.tracker = MemoryTracker(round_to=CUDA_BLOCK if on_cuda else 1, device_type="cuda" if on_cuda else None)
        self.tracker.watch_model(model)
        self._label_gradients_first(model)
        self._hooks = [model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
                       model.register_forward_hook(self._forward_ends, always_call=True)]
        self._timer = StepTimer(self.device.type)
        self.tracker.__enter__()
        self._tracking = True

    def _label_gradients_first(self, model: torch.nn.Module) -> None:
        """A layer-wise optimizer (galore_adamw_layerwise) registered its update hook when the Trainer built it,
        before this callback existed; that hook frees the gradient. The tracker's labelling hook is moved ahead
        of it, as training.py registers it first, or the gradient would be counted as backward temporaries."""
        for param in model.parameters():
            hooks = getattr(param, "_post_accumulate_grad_hooks", None)
            if hooks and len(hooks) > 1:  # re-inserted, not move_to_end: autograd walks the plain dict order
                entries = list(hooks.items())
                hooks.clear()
                hooks.update([entries[-1], *entries[:-1]])

    def _enter(self, phase: str) -> None:
        self._phase.close()
        if self.tracker is not None:
            self._phase.enter_context(self.tracker.phase(phase))

    def _forward_begins(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and self._batch is None:
            self._batch = (int(ids.shape[0]), int(ids.shape[1]))
        if module.training:
            self._enter("forward")

    def _forward_ends(self, module: Any, args: Any, output: Any) -> None:
        if module.training:
            self._enter("backward")  # the loss is computed inside the model's forward; what follows is backward

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._timer is not None:
            self._timer.__enter__()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._enter("optimizer")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None and self._tracking:
            self.tracker.label(optimizer_state_tensors(optimizer), "optimizer_states")
        self._enter("other")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._timer is not None:
            self._timer.__exit__()
        assert self.tracker is not None
        if state.global_step == 1:  # the steady state starts with step 2, as in the measure engine
            self.tracker.reset_peak()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        if state.global_step == self.track_steps:
            self._stop_tracking()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def _stop_tracking(self) -> None:
        if self.tracker is None or not self._tracking:
            return
        self._phase.close()
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            self._cuda = {"allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
                          "reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
                          "num_ooms": stats.get("num_ooms", 0),
                          "num_alloc_retries": stats.get("num_alloc_retries", 0),
                          "nvml_used_bytes_after": training.nvml_used_bytes()}
        self.tracker.__exit__(None, None, None)
        self.tracker.unwatch()
        self._tracking = False

    # -- the record ----------------------------------------------------------------------------------------
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._stop_tracking()
        for hook in self._hooks:
            hook.remove()
        scenario = self._scenario(args, model)
        record = self.record(scenario, state.global_step, model, kwargs.get("optimizer"))
        self.record_path = store.write(record, self.out)

    def _scenario(self, args: Any, model: Any) -> Scenario:
        if self.scenario_path is not None:
            return load_scenario(str(self.scenario_path))
        if self._batch is None:
            raise RuntimeError("GaloreBenchCallback: the model never saw input_ids; pass scenario=")
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "config.json"
            model.config.to_json_file(config)
            training_args = {**args.to_dict(), "per_device_train_batch_size": self._batch[0]}
            document, _ = hf_args.scenario_document(training_args, str(config), self._batch[1], folder=Path(folder),
                                                    dtype=_dtype_name(next(model.parameters()).dtype))
            return hf_args.validated(document, Path(folder), self.name)

    def record(self, scenario: Scenario, steps: int, model: Any, optimizer: Any) -> RunRecord:
        """The run's record: the same skeleton and memory fields as a measure record of `scenario`."""
        assert self.tracker is not None and self._timer is not None
        run = scenario.runs[0]
        record = assemble.new_record(scenario, run, "measure", training.record_device("measure", self.device.type))
        record["train"]["steps"] = steps
        result = {"tracker": self.tracker, "cuda": self._cuda, "device_type": self.device.type, "model": model,
                  "trainer_info": {"optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
                                   "loop": "transformers.Trainer"}}
        memory = assemble.traced_memory(result, extra_step=None)
        if steps < 2:  # training ended before a steady step: the peak is step 1's, optimizer states being created
            memory["steady_state_from_step"] = None
        memory["source"] = SOURCE if not self._cuda else memory["source"]
        if not self._cuda:
            memory["process_rss_bytes"] = psutil.Process().memory_info().rss
        assemble.fill_trained(record, memory, result)
        tracked = list(range(min(self.track_steps, len(self._timer.times))))
        speed = throughput(self._timer.times, assemble.tokens_per_step(scenario), self.device.type, tracked=tracked)
        assemble.fill_steps(record, {"losses": self._losses, "evals": []}, speed, None)
        record["status"] = "ok"
        return assemble.close_record(record, scenario, self._started)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
