"""Imports go down the stages only, with no cycle; an import inside a function must say why it is lazy."""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import galore_bench

# check/compare renders with report's table helpers: check sits above report, never the other way round
# chunked_loss and model_dtype_loss sit beside models: losses users import for real training (torch, transformers)
STAGE = {"": 0, "errors": 0, "units": 0, "readings": 0, "settings": 0, "models": 1, "chunked_loss": 1,
         "model_dtype_loss": 1, "data": 1, "data_bytes": 1, "optim": 2, "methods": 3, "spec": 4, "measure": 5,
         "record": 6, "record_types": 6, "record_upgrade": 6, "store": 7, "run": 8, "integrations": 9, "report": 9,
         "check": 10, "cli": 11}
LAZY = {  # (importer, imported; a package stands for its modules) -> why the import waits inside a function
    ("galore_bench.data", "sentencepiece"): "only the wiki corpus is tokenized",
    ("galore_bench.measure.training", "pynvml"): "only on CUDA; a machine without NVML is answered with None",
    ("galore_bench.methods.adam8bit", "bitsandbytes"): "starts CUDA at import; the fork-server preload "
                                                       "(run.worker) must not: test_fork_safety.py",
    ("galore_bench.optim.galore", "bitsandbytes"): "the same: CUDA at import",
    ("galore_bench.optim.bnb4bit", "bitsandbytes"): "the same: CUDA at import (the tracker imports this module)",
    ("galore_bench.methods.qlora", "bitsandbytes"): "the same: CUDA at import",
    ("galore_bench.optim.relora", "peft"): "peft imports bitsandbytes",
    ("galore_bench.methods.adapters", "peft"): "peft imports bitsandbytes",
    ("galore_bench.methods.peft", "peft"): "peft imports bitsandbytes",
    ("galore_bench.optim.torchao_lowbit", "torchao"): "seconds to import (its compiler hooks); only its two methods "
                                                       "need it",
    ("galore_bench.methods.adafactor", "transformers"): "transformers.optimization imports bitsandbytes",
    ("galore_bench.run.cluster", "submitit"): "an optional extra, galore-bench[cluster]",
    ("galore_bench.report.render", "galore_bench.report.charts"): "matplotlib only when a chart is drawn",
    ("galore_bench.cli", "galore_bench"): "a command loads its stage when it runs: `--help` loads parsers",
    ("galore_bench.cli", "rich.table"): "the same: a table only when a command prints one",
}


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import and importlib.import_module("...") of a file."""
    tree, found = ast.parse(path.read_text()), []
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant)]
        found += [(name, id(node) in lazy) for name in names]
    return found


def test_imports_follow_the_stages_without_a_cycle_and_lazy_ones_say_why():
    root = Path(galore_bench.__file__).parent
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    within = lambda name, package: f"{name}.".startswith(f"{package}.")
    stage = lambda module: STAGE[module.split(".")[1] if "." in module else ""]
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        for name, lazy in imports(path, set(files)):
            if lazy:
                assert any(within(module, a) and within(name, b) for a, b in LAZY), f"{module}: lazy {name}"
            if within(name, "galore_bench") and name != module:
                assert stage(name) <= stage(module), f"{module} imports up: {name}"
                graph.setdefault(module, set()).add(name)
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names the cycle
    assert len(files) > 45 and sum(map(len, graph.values())) > 100  # the walk saw the package


def test_help_loads_the_parsers_only():
    """What the cli's lazy imports are for: `--help` and `list` load no stage a command runs, nor pandas."""
    stages = tuple(f"galore_bench.{stage}" for stage in ("run", "measure", "report", "check")) + ("pandas",)
    code = f"import sys, galore_bench.cli; print([m for m in sys.modules if m.startswith({stages})])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.split("\n")[-2] == "[]"
