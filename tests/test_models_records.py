"""Model zoo sizes against the papers' counts, and record storage (atomic, never overwritten, versioned)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from galore_bench.errors import UserError
from galore_bench.models import ZOO, build_model, parameter_count
from galore_bench.record import SCHEMA_VERSION, empty_record, load_record, write_record
from galore_bench.spec.scenario import load_scenario
from galore_bench.units import format_bytes, parse_bytes

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llama_configs.csv"


def test_7b_parameter_bytes_exact():
    model = build_model(ZOO["7b"], "bf16", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == 6_738_415_616 == parameter_count(ZOO["7b"])
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == 6_738_415_616 * 2


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not beside the checkout")
def test_zoo_matches_reference_table():
    rows = [r for r in csv.reader(line for line in REFERENCE.open() if not line.startswith("#"))]
    header, rows = rows[0], rows[1:]
    assert len(rows) == 5
    for row in (dict(zip(header, r)) for r in rows):
        shape = ZOO[row["size"]]
        assert (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.num_attention_heads) == (
            int(row["hidden"]), int(row["intermediate"]), int(row["layers"]), int(row["heads"]))
        assert round(parameter_count(shape) / 1e6, 1) == float(row["params"].rstrip("M"))


def test_built_tiny_model_matches_closed_form():
    model = build_model(ZOO["tiny"], "bf16")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(ZOO["tiny"])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_units():
    assert parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="GiB"):
        parse_bytes("lots")
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def _record() -> dict:
    scenario = load_scenario("smoke_cpu")
    run = scenario.runs[0]
    return empty_record(scenario.to_dict(), {"label": run.label, "method": run.method, "options": run.options},
                        "measure", "cpu")


def test_record_written_atomically_and_never_overwritten(tmp_path):
    record = _record()
    first = write_record(record, tmp_path)
    second = write_record(record, tmp_path)  # same timestamp: must not replace the first
    assert first != second and first.exists() and second.exists()
    assert load_record(first) == record
    assert not list(tmp_path.rglob(".tmp-*"))
    for key in ("schema_version", "scenario", "method", "mode", "device", "status", "error", "model", "train",
                "memory", "throughput", "quality", "env"):
        assert key in record


def test_other_schema_version_is_a_clear_error(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**_record(), "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="update galore-bench"):
        load_record(path)
    path.write_text(json.dumps({**_record(), "schema_version": 0}))
    with pytest.raises(UserError, match="re-run the scenario"):
        load_record(path)
