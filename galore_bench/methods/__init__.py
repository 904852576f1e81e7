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
from typing import Any

from galore_bench.errors import UserError
from galore_bench.methods import (
    adafactor,
    adalomo,
    adam8bit,
    adamw,
    apollo,
    badam,
    fira,
    galore,
    inference,
    lomo,
    lora,
    muon,
    peft,
    q_apollo_mini,
    qgalore,
    qlora,
    sgd,
    torchao_adamw,
)
from galore_bench.methods.base import MethodDef, Option, TracePlan, Trainer, TrainSettings
from galore_bench.methods.terms import EstimateTerms

METHODS: tuple[MethodDef, ...] = (
    adamw.METHOD,
    sgd.METHOD,
    adam8bit.METHOD,
    adafactor.METHOD,
    galore.METHOD,
    galore.METHOD_8BIT,
    fira.METHOD,
    qgalore.METHOD,
    q_apollo_mini.METHOD,
    apollo.METHOD,
    apollo.METHOD_MINI,
    muon.METHOD,
    lomo.METHOD,
    adalomo.METHOD,
    badam.METHOD,
    lora.LORA,
    lora.RELORA,
    lora.LOW_RANK,
    peft.METHOD,
    qlora.METHOD,
    torchao_adamw.METHOD_8BIT,
    torchao_adamw.METHOD_4BIT,
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


def _load_entry_point(point: importlib.metadata.EntryPoint) -> Any:
    try:
        return point.load()
    except Exception as exc:  # an installed package's broken plugin: one message naming it
        raise UserError(f"entry point {point.name} ({ENTRY_POINT_GROUP}): cannot load method plugin "
                        f"{point.value}: {exc}") from exc


class Registry(Mapping[str, MethodDef]):
    """name -> MethodDef: the shipped methods, then entry-point plugins, then the modules GALORE_BENCH_METHODS
    names now (re-read whenever the variable changes, so setting or clearing it after import counts)."""

    def __init__(self, shipped: tuple[MethodDef, ...]) -> None:
        self._shipped = shipped
        self._methods: dict[str, MethodDef] = {}
        self._imported: dict[str, tuple[MethodDef, ...]] = {}
        self._built_for: str | None = None

    def _plugin(self, spec: str) -> tuple[MethodDef, ...]:
        if spec not in self._imported:
            try:
                module = _import(spec)
            except Exception as exc:  # a plugin's own bug is the user's input too: one message, not a traceback
                raise UserError(f"{PLUGIN_ENV}: cannot import method plugin {spec}: {exc}") from exc
            self._imported[spec] = _definitions(spec, module)
        return self._imported[spec]

    def _refresh(self) -> None:
        specs = os.environ.get(PLUGIN_ENV) or ""
        if specs == self._built_for:
            return
        sources = [("entry point " + point.name, _definitions(point.name, _load_entry_point(point)))
                   for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
        sources += [(spec, self._plugin(spec)) for spec in filter(None, (s.strip() for s in specs.split(",")))]
        methods = {m.name: m for m in self._shipped}
        for source, defs in sources:
            for method in defs:
                if methods.get(method.name, method) is not method:
                    raise UserError(f"method plugin {source}: method name '{method.name}' is already registered")
                methods[method.name] = method
        self._methods, self._built_for = methods, specs

    def reload(self) -> None:
        """Read the entry points and the variable again on next use (a package installed since; tests)."""
        self._built_for = None

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
