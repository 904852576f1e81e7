"""The method registry: the shipped methods as an explicit tuple, in the fixed order reports use, then plugins.

A plugin is a module whose `METHODS` (a tuple) or `METHOD` is a MethodDef, named in the GALORE_BENCH_METHODS
environment variable (module names or .py files, comma-separated) or installed under the `galore_bench.methods`
entry-point group. Both are read on first use of the registry, so a bad plugin is a one-line error.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

from galore_bench.errors import UserError
from galore_bench.methods import adafactor, adam8bit, adamw, galore, inference, lomo, lora, sgd
from galore_bench.methods.base import MethodDef, Option, TracePlan, Trainer, TrainSettings
from galore_bench.methods.terms import EstimateTerms

METHODS: tuple[MethodDef, ...] = (
    adamw.METHOD,
    sgd.METHOD,
    adam8bit.METHOD,
    adafactor.METHOD,
    galore.METHOD,
    galore.METHOD_8BIT,
    lomo.METHOD,
    lora.LORA,
    lora.RELORA,
    lora.LOW_RANK,
    inference.METHOD,
)
PLUGIN_ENV = "GALORE_BENCH_METHODS"
ENTRY_POINT_GROUP = "galore_bench.methods"


def _import(spec: str) -> ModuleType:
    """A module by dotted name, or a .py file by path (loaded once under a name derived from its path)."""
    if not spec.endswith(".py"):
        return importlib.import_module(spec)
    path = Path(spec).resolve()
    name = "galore_bench_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path))
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.spec_from_file_location(name, path)
    if found is None or found.loader is None or not path.is_file():
        raise ImportError(f"no such file: {path}")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    found.loader.exec_module(module)
    return module


def _definitions(source: str, found: object) -> tuple[MethodDef, ...]:
    """A module's METHODS or METHOD; an entry point may also name a MethodDef or a tuple of them."""
    if isinstance(found, ModuleType):
        found = getattr(found, "METHODS", None) or getattr(found, "METHOD", None)
    defs = (found,) if isinstance(found, MethodDef) else tuple(found) if isinstance(found, Iterable) else ()
    if not defs or not all(isinstance(d, MethodDef) for d in defs):
        raise UserError(f"method plugin {source}: defines no METHODS (a tuple of MethodDef) or METHOD")
    return defs


class Registry(Mapping[str, MethodDef]):
    """name -> MethodDef: the shipped methods, then entry-point plugins, then GALORE_BENCH_METHODS' modules
    (re-read whenever the variable changes, so setting it after import still counts)."""

    def __init__(self, shipped: tuple[MethodDef, ...]) -> None:
        self._methods = {m.name: m for m in shipped}
        self._loaded: set[str] = set()
        self._entry_points_read = False
        self._env_read: str | None = None

    def _add(self, source: str, found: object) -> None:
        for method in _definitions(source, found):
            known = self._methods.get(method.name)
            if known is not None and known is not method:
                raise UserError(f"method plugin {source}: method name '{method.name}' is already registered")
            self._methods[method.name] = method

    def _use(self, specs: str) -> None:
        for spec in filter(None, (s.strip() for s in specs.split(","))):
            if spec in self._loaded:
                continue
            try:
                module = _import(spec)
            except ImportError as exc:
                raise UserError(f"{PLUGIN_ENV}: cannot import method plugin {spec}: {exc}") from exc
            self._add(spec, module)
            self._loaded.add(spec)

    def _refresh(self) -> None:
        if not self._entry_points_read:
            for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._add(f"entry point {point.name}", point.load())
            self._entry_points_read = True
        specs = os.environ.get(PLUGIN_ENV) or ""
        if specs != self._env_read:
            self._use(specs)
            self._env_read = specs

    def __getitem__(self, name: str) -> MethodDef:
        self._refresh()
        return self._methods[name]

    def __iter__(self) -> Iterator[str]:
        self._refresh()
        return iter(list(self._methods))

    def __len__(self) -> int:
        self._refresh()
        return len(self._methods)


REGISTRY = Registry(METHODS)


def use_plugins(specs: str | None) -> None:
    """In a run's own process: the plugins of the process that asked for the run (a fork server keeps the
    environment it was started with, which may predate GALORE_BENCH_METHODS)."""
    if specs:
        os.environ[PLUGIN_ENV] = specs
    else:
        os.environ.pop(PLUGIN_ENV, None)


__all__ = ["ENTRY_POINT_GROUP", "METHODS", "PLUGIN_ENV", "REGISTRY", "EstimateTerms", "MethodDef", "Option",
           "TracePlan", "TrainSettings", "Trainer", "use_plugins"]
