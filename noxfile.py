"""nox sessions: tests, lint, typecheck, budgets, bench, properties.

`nox -s tests` builds a fresh venv (CPU torch pinned by constraints/cpu.txt);
`NOX_REUSE=1 nox -s tests` reuses the current environment instead (no install step).
"""
from __future__ import annotations

import os

import nox

REUSE = os.environ.get("NOX_REUSE") == "1"
BACKEND = "none" if REUSE else None
nox.options.sessions = ["tests", "lint", "typecheck", "budgets"]


def install(session: nox.Session) -> None:
    if not REUSE:
        session.install("-c", "constraints/cpu.txt", "-e", ".[test,dev]")


@nox.session(venv_backend=BACKEND)
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session(venv_backend=BACKEND)
def lint(session: nox.Session) -> None:
    if not REUSE:
        session.install("ruff")
    session.run("ruff", "check", "galore_bench", "tests", "benchmarks")


@nox.session(venv_backend=BACKEND)
def typecheck(session: nox.Session) -> None:
    install(session)
    session.run("mypy", "galore_bench", "--ignore-missing-imports")


@nox.session(venv_backend=BACKEND)
def budgets(session: nox.Session) -> None:
    """Simulate every budgeted scenario, then check the records against budgets/ci.toml (exit 1 on a violation)."""
    install(session)
    session.run("galore-bench", "check", "--budgets", "budgets/ci.toml", "--run", "results/ci-budgets")


@nox.session(venv_backend=BACKEND)
def bench(session: nox.Session) -> None:
    install(session)
    session.run("pytest", "benchmarks", "--benchmark-enable", *session.posargs)


@nox.session(venv_backend=BACKEND)
def properties(session: nox.Session) -> None:
    """The hostile-input property tests with many more examples than CI draws (HYPOTHESIS_EXAMPLES, default 500)."""
    install(session)
    examples = session.posargs[0] if session.posargs else "500"
    session.run("pytest", "-q", "tests/test_hostile_properties.py", "tests/test_hostile_inputs.py", "-k", "generated",
                env={"HYPOTHESIS_EXAMPLES": examples})

