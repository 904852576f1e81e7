"""What a run's own process is asked to do: one frozen, picklable value from the sweep (or a cluster job)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from galore_bench.methods import use_plugins
from galore_bench.spec.scenario import RunSpec, Scenario, load_scenario


@dataclass(frozen=True)
class RunRequest:
    """One run of one scenario. The sweep hands over the scenario it validated, so a file edited mid-sweep
    cannot change the runs still to come; without it (`ranks` started by torchrun) the child loads the file."""

    scenario: str  # a shipped scenario's name or a .toml path, as load_scenario takes it
    run_index: int  # which of the scenario's runs
    out: Path  # the results folder the record goes to
    mode: str | None = None  # None: the scenario's own mode
    steps: int | None = None  # None: the scenario's train.steps
    threads: int | None = None  # torch threads for the child; None: torch's default
    fault: str | None = None  # test hook: "kill:<label>" or "oom:<label>" (run.worker.FAULT_ENV)
    memory_snapshot: bool = False  # also dump the CUDA allocator's snapshot beside the record
    method_plugins: str | None = None  # the asking process's GALORE_BENCH_METHODS (a fork server's may predate it)
    validated: Scenario | None = None  # the scenario as the asker validated it (frozen and picklable)

    def load(self) -> tuple[Scenario, RunSpec]:
        """The scenario and the run, with the asker's method plugins registered in this process too."""
        use_plugins(self.method_plugins)
        scenario = self.validated if self.validated is not None else load_scenario(self.scenario)
        return scenario, scenario.runs[self.run_index]
