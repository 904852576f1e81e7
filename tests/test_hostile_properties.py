"""Generated scenario documents (a valid one with fields swapped for wrong types, extreme or non-finite
numbers and hostile strings): `run --mode estimate` answers with records or one message, never a traceback
or a file outside --out. CI draws a bounded number; HYPOTHESIS_EXAMPLES raises it for a longer run."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from galore_bench.cli import main

ESCAPE = Path(tempfile.gettempdir()) / "galore-bench-property-escape"
HOSTILE = st.sampled_from([f"{ESCAPE}/x", "../../x", "a/b", ".x", "..", "", "a\x00b", "x" * 300, "[/x]",
                           "[x=y]", "nan", "tiny", "sgd", "adamw", "bf16", "estimate", "1 GiB", "-1 GiB"])
TEXT = HOSTILE | st.text(max_size=12)
NUMBER = (st.integers(-2, 4) | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([10**400, -1e300]))
WRONG = st.deferred(lambda: st.booleans() | NUMBER | TEXT | st.lists(TEXT | NUMBER, max_size=2)
                    | st.dictionaries(st.sampled_from(["size", "a", "method"]), TEXT, max_size=2))
VALID: dict[tuple[Any, ...], list[Any]] = {  # where a value goes -> values that are right there
    ("model", "size"): ["tiny", "60m"], ("train", "dtype"): ["fp32", "bf16"], ("train", "steps"): [1, 3],
    ("train", "seq_len"): [16, 64], ("train", "lr_schedule"): ["constant", "cosine"],
    ("device", "mode"): ["estimate", "auto"], ("device", "budget"): ["1 GiB", "0.5GB"],
    ("eval", "data"): ["synthetic"], ("description",): ["any text"], ("runs", 0, "method"): ["sgd", "lomo"],
    ("runs", 0, "model"): ["tiny"], ("runs", 0, "label"): ["a.b", "run-1"], ("runs", 0, "lr"): [0.1, 1],
    ("runs", 1, "momentum"): [0.9], ("runs", 1, "label"): ["sgd.v2"], ("distributed", "strategy"): ["ddp"],
}
FIELDS = {where: st.sampled_from(valid) | WRONG for where, valid in VALID.items()}


def base() -> dict[str, Any]:
    return {"model": {"size": "tiny"}, "train": {"batch_size": 2, "seq_len": 32, "steps": 2},
            "device": {"budget": "1 GiB"}, "runs": [{"method": "adamw"}, {"method": "sgd"}]}


def toml_value(value: Any) -> str:
    """TOML for one value, inline (a tiny writer: the standard library only reads TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf") if not math.isfinite(value) \
            else repr(value)
    if isinstance(value, str):
        unsafe = lambda c: ord(c) < 32 or ord(c) == 127 or c in '"\\'  # TOML wants these escaped
        escaped = "".join(f"\\u{ord(c):04x}" if unsafe(c) else c for c in value)
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def refuse_constant(name: str) -> None:
    raise AssertionError(f"a record holds non-standard JSON: {name}")


def put(document: dict[str, Any], where: tuple[Any, ...], value: Any) -> None:
    for key in where[:-1]:
        document = document.setdefault(key, {}) if isinstance(key, str) else document[key]
    document[where[-1]] = value


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    document = base()
    fields = st.lists(st.sampled_from(sorted(FIELDS, key=str)), min_size=1, max_size=4, unique=True)
    for where in draw(fields):
        put(document, where, draw(FIELDS[where]))
    return document


@settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(documents())
def test_a_generated_scenario_is_run_or_refused_with_one_message(document):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        scenario = root / "generated.toml"
        scenario.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in document.items()))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["run", "--scenario", str(scenario), "--mode", "estimate", "--out",
                         str(root / "out")])
        message = err.getvalue()
        event(f"exit {code}")
        assert code in (0, 1), message
        assert "Traceback" not in message
        if code == 1:
            assert "galore-bench: error: " in message, message
        written = {p for p in root.rglob("*") if p.is_file()} - {scenario}
        assert all(p.is_relative_to(root / "out") for p in written), written
        for record in written:  # strict JSON: no NaN or Infinity
            json.loads(record.read_text(), parse_constant=refuse_constant)
    assert not ESCAPE.exists()
