"""Model zoo sizes against the papers' counts, and record storage (atomic, never overwritten, versioned)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.models import ZOO, build_model, parameter_count
from galore_bench.record import (
    SCHEMA_VERSION,
    breakdown_of,
    memory_value,
    memory_values,
    peak_of,
    problems_in,
    reserved_of,
)
from galore_bench.record_upgrade import upgrade_1_to_2, upgrade_2_to_3
from galore_bench.run.assemble import new_record
from galore_bench.spec.scenario import load_scenario
from galore_bench.units import format_bytes, parse_bytes

from fixtures.records import make_record, parts

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llama_configs.csv"
REPORTS = Path(__file__).resolve().parents[1] / "reports"


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
    return new_record(scenario, scenario.runs[0], "measure", "cpu")


def test_record_written_atomically_and_never_overwritten(tmp_path):
    record = _record()
    first = store.write(record, tmp_path)
    second = store.write(record, tmp_path)  # same timestamp: must not replace the first
    assert first != second and first.exists() and second.exists()
    assert store.load(first) == record and record["schema_version"] == SCHEMA_VERSION == 3
    assert not list(tmp_path.rglob(".tmp-*"))


def test_an_incomplete_record_is_never_written(tmp_path):
    record = _record()
    del record["memory"]["cuda"]
    with pytest.raises(ValueError, match="memory.cuda: missing"):
        store.write(record, tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_other_schema_versions_are_clear_errors(tmp_path):
    path = tmp_path / "newer.json"
    path.write_text(json.dumps({**_record(), "schema_version": 4}))
    with pytest.raises(UserError, match="newer.json: schema_version: got 4, allowed 3 .*update galore-bench"):
        store.load(path)
    path.write_text(json.dumps({**_record(), "schema_version": 0}))
    with pytest.raises(UserError, match="re-run the scenario"):
        store.load(path)


def test_a_damaged_field_names_the_file_and_the_field(tmp_path):
    damaged = _record()
    damaged["memory"]["breakdown"] = {"weights": "12 GiB"}
    del damaged["quality"]["data"]
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(damaged))
    with pytest.raises(UserError) as caught:
        store.load(path)
    assert str(caught.value) == (f"{path}: memory.breakdown.weights: got '12 GiB', allowed a finite number "
                                 "(bytes); quality.data: missing (a damaged record?)")


def test_every_committed_record_loads_at_version_3():
    files = sorted(REPORTS.glob("*/records/**/*.json"))
    stored = store.load_all(sorted(REPORTS.glob("*/records")))
    assert files and len(stored) == len(files)  # every committed record, measured and simulated, loads
    assert {record["schema_version"] for _, record in stored} == {3}


def test_a_version_1_record_upgrades_with_its_missing_fields_filled():
    path = REPORTS / "cpu-simulate/records/simulated-cpu/lomo_65b_3090/lomo-7b.simulate.20261123T185135Z.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and "git_dirty" not in raw["env"]
    assert "category_peaks" not in raw["memory"]
    assert "estimate" not in raw["memory"] and "traceback" not in raw
    record = upgrade_1_to_2(raw)
    assert record["schema_version"] == 2
    assert record["memory"]["category_peaks"] is None and record["memory"]["estimate"] is None
    assert record["memory"]["cuda"] is None and record["env"]["git_dirty"] is None
    assert record["traceback"] is None and record["cross_check_errors"] == {}
    assert record["distributed"] == raw["distributed"]  # present in this one: kept as it was
    assert peak_of(record) == raw["memory"]["peak_bytes"] == 15_090_087_936
    assert breakdown_of(record) == raw["memory"]["breakdown"]
    assert problems_in(upgrade_2_to_3(dict(record))) == [] and raw["schema_version"] == 1  # input left as it was
    measured = json.loads((REPORTS / "cpu-measure/records/cpu/ppl_cpu/adamw.measure.20261123T181215Z.json")
                          .read_text())
    assert upgrade_1_to_2(measured)["distributed"] is None  # a single-device v1 record had no such key


def test_newest_picks_per_key_with_ok_only_and_mode(tmp_path):
    def stored(run: str, minute: int, status: str = "ok", mode: str = "simulate"):
        created = f"2026-01-01T00:{minute:02d}:00Z"
        record = make_record(run, parts(1), status=status, mode=mode, created=created)
        return tmp_path / f"{run}-{minute}.json", record

    rows = [stored("a", 1), stored("a", 3, "oom"), stored("a", 2, mode="measure"), stored("b", 5)]
    newest = store.newest(rows, store.by_run)
    assert {key: path.name for key, (path, _) in newest.items()} == {("smoke_cpu", "a"): "a-3.json",
                                                                     ("smoke_cpu", "b"): "b-5.json"}
    assert store.newest(rows, store.by_run, ok_only=True)[("smoke_cpu", "a")][0].name == "a-2.json"
    simulated = store.newest(rows, store.by_run, ok_only=True, mode="simulate")
    assert simulated[("smoke_cpu", "a")][0].name == "a-1.json"
    assert len(store.newest(rows, store.by_run_and_mode)) == 3


def test_memory_accessors_read_one_record_the_same_way():
    record = make_record("galore", parts(10, 20, 30, 40, 50), category_peaks=parts(10, 25, 30, 90, 60),
                         allocator_model={"peak_reserved_bytes": 200, "out_of_memory": None})
    assert memory_values(record) == {"peak": 150, "weights": 10, "gradients": 20, "optimizer_states": 30,
                                     "activations": 40, "other": 50, "max weights": 10, "max gradients": 25,
                                     "max optimizer_states": 30, "max activations": 90, "max other": 60,
                                     "reserved": 200}
    assert reserved_of(record) == (200, "allocator model")
    record["memory"]["cuda"] = {"reserved_bytes": 180}
    assert reserved_of(record) == (180, "measured") and memory_value(record, "reserved") == 180


def test_a_version_2_record_gains_readings_from_its_own_fields_only():
    """Simulate: allocated and reserved are the allocator model's (as that record holds them), device_total the
    labelled estimate; a CPU measurement: allocated is the tracker's exact peak, no reserved or device total."""
    model = {"peak_reserved_bytes": 40 << 20, "peak_allocated_bytes": 30 << 20, "out_of_memory": None}
    simulated = upgrade_2_to_3(make_record("adamw", {"weights": 29 << 20}, allocator_model=model))
    found = simulated["memory"]["readings"]
    assert simulated["schema_version"] == 3 and problems_in(simulated) == []
    assert (found["allocated"]["bytes"], found["allocated"]["kind"]) == (30 << 20, "model")
    assert found["reserved"]["bytes"] == 40 << 20
    total = found["device_total"]
    assert total["kind"] == "estimate" and total["bytes"] == (40 << 20) + total["context_bytes"] + (20 << 20)
    assert "schema 2 record" in found["allocated"]["source"]
    cpu = upgrade_2_to_3(make_record("adamw", {"weights": 1000}, mode="measure", device="cpu"))["memory"]["readings"]
    assert cpu["allocated"]["bytes"] == 1000 and cpu["reserved"]["bytes"] is None
    assert cpu["device_total"]["bytes"] is None
