"""The paper tables shipped in the package: each number has its table, row, unit and citation, the units are
the ones the reports assume, and every number equals ../shared/reference's transcription where that exists."""
from __future__ import annotations

import importlib.metadata
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from galore_bench.report.references import TABLES, paper_table, read_numbers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
SOURCES = {"lomo": ("arXiv 2306.09782",), "galore": ("arXiv 2403.03507",),  # a paper, or the repositories
           "successors": ("jiaweizzhao/GaLore: ", "VITA-Group/Q-GaLore: ", "zhuhanqing/APOLLO: ", "Ledzy/BAdam: ")}
NOT_SHARED = {"successors_7b_claims": "Ledzy/BAdam:"}  # rows from a source ../shared has not transcribed
# our table -> (shared file, {our key column: its column}, {our quantity: its column})
SHARED_LAYOUT = {
    "lomo_table1": ("lomo_table1.csv", {"optimizer": "optimizer", "activation_checkpointing": "ac"},
                    {"weights": "params", "gradients": "gradients", "optimizer_states": "optimizer_states",
                     "activations": "activations", "total": "total_printed"}),
    "lomo_table2": ("lomo_table2.csv", {"model": "params", "optimizer": "optimizer"},
                    {"gpus": "gpus", "memory_per_gpu": "memory_per_gpu_gb", "tgs": "tgs"}),
    "galore_table2": ("galore_table2.csv", {"method": "method", "size": "size"},
                      {"perplexity": "perplexity", "memory": "memory_gb",
                       "training_tokens": "training_tokens"}),
    "galore_table3": ("galore_table3_7b.csv", {"method": "method"},
                      {"memory": "mem_gb",
                       **{f"perplexity_{k}": f"ppl_{k}" for k in ("40k", "80k", "120k", "150k")}}),
    "galore_table6": ("galore_table6_split.csv", {"method": "method", "size": "size"},
                      {"weights": "weights_gb", "optimizer_states": "optimizer_states_gb"}),
    "galore_table11": ("galore_table11_1b.csv", {"optimizer": "optimizer", "per_layer_update": "per_layer_update"},
                       {"memory": "memory_gb", "throughput": "tokens_per_s"}),
    "galore_7b_totals": ("galore_memory_7b.csv", {"claim": "item", "kind": "kind"}, {"memory": "value_gb"}),
    "successors_7b_claims": ("external/galore_family_readmes.csv", {"source": "source"},
                             {"memory": "value", "memory_low": "value"}),
}
# the unit each report column assumes (LOMO prints "GB" for GiB; GaLore's GB are 1e9 bytes)
UNITS = {"lomo_table1": {"*": "GiB"},
         "lomo_table2": {"gpus": "GPUs", "memory_per_gpu": "GiB", "tgs": "tokens/GPU/s"},
         "galore_table2": {"perplexity": "dimensionless", "memory": "GB", "training_tokens": "tokens"},
         "galore_table3": {"memory": "GB", "*": "dimensionless"}, "galore_table6": {"*": "GB"},
         "galore_table11": {"memory": "GB", "throughput": "tokens/s"}, "galore_7b_totals": {"*": "GB"},
         "successors_7b_claims": {"*": "GB"}}


def shared_number(text: str, quantity: str = "") -> float:
    """A shared cell as a number: its training-token counts are written '1.1B'; a range '11-12 (...)' gives its
    low end for a '_low' quantity, else its high end."""
    if "-" in text.split(" ")[0]:
        low, high = text.split(" ")[0].split("-")
        return float(low if quantity.endswith("_low") else high)
    return float(text[:-1]) * 1e9 if text.endswith("B") else float(text)


def test_every_packaged_table_is_listed_and_cites_its_paper_row_by_row():
    files = sorted(e.name for e in (resources.files("galore_bench") / "report" / "reference").iterdir()
                   if e.name.endswith(".csv"))
    assert files == sorted(f"{name}.csv" for name in TABLES) and len(files) == 8
    for name in TABLES:
        numbers = read_numbers(name)
        assert numbers is not None and len(numbers) > 0
        assert list(numbers.columns[:2]) == ["table", "row"] and {"unit", "citation"} <= set(numbers.columns)
        paper = name.split("_")[0]
        for number in numbers.to_dict("records"):
            assert number["table"] and number["row"], number
            assert any(source in number["citation"] for source in SOURCES[paper]), number
            assert number["table"] in number["citation"], number
            units = UNITS[name]
            assert number["unit"] == units.get(number["quantity"], units.get("*")), (name, number)


def test_wide_tables_have_one_row_per_paper_row():
    table1 = paper_table("lomo_table1").set_index(["optimizer", "activation_checkpointing"])
    assert len(table1) == 6 and table1.loc[("lomo", "yes"), "total"] == 14.58
    assert table1.loc[("adamw", "no"), "optimizer_states"] == 75.31
    table2 = paper_table("galore_table2").set_index(["method", "size"])
    assert len(table2) == 20 and table2.loc[("galore", "1b"), "perplexity"] == 15.64
    assert table2.loc[("galore", "1b"), "training_tokens"] == 13.1e9


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no {SHARED} beside the checkout (a clone on its own): "
                    "nothing to check the packaged tables against")
@pytest.mark.parametrize("name", TABLES)
def test_every_packaged_number_equals_the_shared_transcription(name: str):
    file, keys, columns = SHARED_LAYOUT[name]
    shared = pd.read_csv(SHARED / file, comment="#", dtype=str, keep_default_na=False)
    shared = shared.set_index(list(keys.values()))
    numbers = read_numbers(name)
    if name in NOT_SHARED:  # checked against their own source below
        numbers = numbers[~numbers["source"].str.startswith(NOT_SHARED[name])]
    compared = 0
    for number in numbers.to_dict("records"):
        key = tuple(number[k] for k in keys)
        cell = shared.loc[key if len(key) > 1 else key[0], columns[number["quantity"]]]
        assert number["value"] == shared_number(cell, number["quantity"]), (name, key, number["quantity"], cell)
        compared += 1
    assert compared == len(numbers) > 0
    ours = {tuple(row[k] for k in keys) for row in numbers.to_dict("records")}
    theirs = {key if isinstance(key, tuple) else (key,) for key in shared.index}
    assert ours == theirs  # no paper row left out of ours, none added


def test_badam_claim_equals_the_installed_packages_readme():
    """BAdam's Llama-3-8B figure, not in ../shared: its README's Table 1, as the badam package ships it."""
    readme = importlib.metadata.metadata("badam").get_payload()
    row = next(line for line in readme.splitlines() if line.startswith("| **BAdam**"))
    header = next(line for line in readme.splitlines() if "Actual Memory Cost (Llama 3-8B)" in line)
    column = [cell.strip() for cell in header.split("|")].index("Actual Memory Cost (Llama 3-8B)")
    printed = [cell.strip() for cell in row.split("|")][column]
    claims = read_numbers("successors_7b_claims")
    badam = claims[claims["method"] == "badam"]
    assert len(badam) == 1 and printed == f"{badam['value'].iloc[0]:g} {badam['unit'].iloc[0]}"  # "23.5 GB"
