"""The loss path at a 128k vocabulary: transformers' full cross-entropy against the chunked one (chunked_loss.py).

Regenerate (CPU only, fake tensors; 10-17 minutes on a busy 2-core machine, mostly the fit confirmations):
    python -m galore_bench.report.loss_path --out reports/cpu-simulate

Three views, each from real code traced on fake tensors or from the closed form (labelled):
  1. the loss path alone (final hidden states and the LM head's weight resident, forward + backward), traced:
     the bytes it adds above its inputs, full and at several chunk sizes, beside the estimate's loss_path terms;
  2. one whole training step of a LLaMA-like 8B shape with Llama-3's vocabulary (activation checkpointing on),
     full and chunked, estimate and simulate peaks;
  3. `fit --search seq_len`: the longest sequence at batch 1 within 24 GiB, full and chunked (estimate), the
     answer confirmed by simulate at that length and one step above.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.loss.loss_utils import ForCausalLMLoss

from galore_bench.chunked_loss import chunked_cross_entropy
from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.measure.largest_batch import fit_rows
from galore_bench.measure.loss_path import loss_path
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.models import DTYPES, ModelShape
from galore_bench.spec.scenario import Scenario, parse_scenario
from galore_bench.units import CUDA_BLOCK

GIB = 2**30
# LLaMA-3.1-8B's widths and vocabulary (its config.json: hidden 4096, intermediate 14336, 32 layers, 32 heads,
# vocab 128256); full multi-head k/v here, the model description of today's zoo (no grouped-query attention)
SHAPE: dict[str, Any] = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "vocab_size": 128256}
TOKENS = 8192
CHUNKS = (512, 1024, 2048, 4096)
RUNS = [{"method": "lomo"}, {"method": "galore8bit", "rank": 1024, "layerwise": True}]
BUDGET = 24 * GIB


def traced_loss_path(shape: ModelShape, tokens: int, dtype: str, chunk: int | None) -> int:
    """Bytes the loss's forward + backward adds above its resident inputs (hidden states, head weight, labels),
    traced on fake tensors with CUDA-block rounding; chunk None: transformers' ForCausalLMLoss on full logits."""
    tracker = MemoryTracker(round_to=CUDA_BLOCK)
    with FakeTensorMode(), tracker:
        hidden = torch.randn(1, tokens, shape.hidden_size, dtype=DTYPES[dtype], requires_grad=True)
        weight = torch.randn(shape.vocab_size, shape.hidden_size, dtype=DTYPES[dtype], requires_grad=True)
        labels = torch.randint(0, shape.vocab_size, (1, tokens))
        tracker.reset_peak()
        resident = tracker.current
        if chunk is None:
            loss = ForCausalLMLoss(hidden @ weight.t(), labels, shape.vocab_size)
        else:
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
        loss.backward()
    return tracker.peak - resident


def scenario(loss: str, seq_len: int = TOKENS, chunk: int = 1024) -> Scenario:
    train = {"batch_size": 1, "seq_len": seq_len, "dtype": "bf16", "loss": loss, "loss_chunk_tokens": chunk,
             "activation_checkpointing": True}  # long contexts on one card: the layers keep only their inputs
    return parse_scenario({"model": SHAPE, "train": train, "device": {"budget": "24 GiB"}, "runs": RUNS},
                          Path("loss_path_128k.toml"))


def whole_steps() -> list[dict[str, Any]]:
    rows = []
    for loss in ("full", "chunked"):
        case = scenario(loss)
        for run in case.runs:
            planned, steps = training.simulation_plan(case, run)
            traced = training.train_steps(case, planned, fake=True, device="cpu", steps=steps)["tracker"]
            rows.append({"loss": loss, "run": run.label, "estimate_bytes": estimate_run(case, run).peak_bytes,
                         "simulate_bytes": traced.peak})
    return rows


def notes(steps: list[dict[str, Any]], fits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What the tables say, computed from them: the step's saving and the length gained, and where simulate
    disagrees with the estimate's answer at the boundary."""
    found = []
    for full, chunked in zip(steps[: len(RUNS)], steps[len(RUNS):], strict=True):
        saved = full["simulate_bytes"] - chunked["simulate_bytes"]
        found.append(f"- {full['run']}: chunking the loss saves {gib(saved)} GiB of the simulated step at {TOKENS} "
                     "tokens.")
    for full, chunked in zip(fits["full"], fits["chunked"], strict=True):
        if full["largest"] and chunked["largest"]:
            found.append(f"- {full['run']}: longest sequence within 24 GiB {full['largest']} -> {chunked['largest']} "
                         f"tokens ({chunked['largest'] / full['largest']:.2f}x).")
    for loss, rows in fits.items():
        for row in rows:
            above = row["simulate_above_largest_bytes"]
            if row["largest"] and above is not None and above <= BUDGET:
                found.append(f"- {loss} {row['run']}: the estimate is conservative at this boundary: simulate also "
                             f"fits {row['largest'] + 256} tokens ({gib(above)} GiB).")
            at = row.get("simulate_at_largest_bytes")
            if at is not None and at > BUDGET:
                found.append(f"- {loss} {row['run']}: the estimate is optimistic at this boundary: simulate at "
                             f"{row['largest']} tokens is {gib(at)} GiB, over the budget.")
    return found


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="reports/cpu-simulate")
    args = parser.parse_args(argv)
    shape = ModelShape(**SHAPE)
    alone: list[dict[str, Any]] = [{"loss": "full", "chunk_tokens": None,
                                    "traced_bytes": traced_loss_path(shape, TOKENS, "bf16", None),
                                    "estimate": loss_path(shape, TOKENS, 2, "full")}]
    alone += [{"loss": "chunked", "chunk_tokens": c, "traced_bytes": traced_loss_path(shape, TOKENS, "bf16", c),
               "estimate": loss_path(shape, TOKENS, 2, "chunked", c)} for c in CHUNKS]
    steps = whole_steps()
    fits = {loss: fit_rows(scenario(loss), BUDGET, confirm=True, search="seq_len", multiple_of=256)
            for loss in ("full", "chunked")}
    command = f"python -m galore_bench.report.loss_path --out {args.out}"
    lines = [
        "# The loss path at a 128k vocabulary: full against chunked cross-entropy", "",
        f"- machine: {platform.node()} ({platform.machine()}, CPU only; simulate = fake tensors, no GPU)",
        f"- generated: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{command}`",
        (f"- shape: LLaMA-like 8B ({SHAPE}; Llama-3.1-8B's widths and vocabulary, multi-head k/v), bf16, "
        f"batch 1 x {TOKENS} tokens, activation checkpointing in sections 2 and 3; GiB = 2^30 bytes; sizes "
        "rounded to the CUDA allocator's 512-byte blocks"),
        "", "## 1. The loss path alone (hidden states and LM-head weight resident; forward + backward)", "",
        ("Traced: the bytes the loss adds above its inputs at its peak, the LM-head weight's and hidden states' "
        "gradients included (0.98 + 0.06 GiB). Estimate: measure/loss_path.py's moment terms (forward; "
        "backward = kept + transients)."), "",
        "| loss | chunk tokens | traced peak above inputs GiB | estimate forward GiB | estimate backward GiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in alone:
        est = row["estimate"]
        backward = est.backward_activations + est.backward_other  # full: the head's gradient comes after
        lines.append(f"| {row['loss']} | {row['chunk_tokens'] or '-'} | {gib(row['traced_bytes'])} "
                     f"| {gib(est.forward)} | {gib(backward)} |")
    lines += ["", "## 2. One training step (simulate: the real step traced; estimate: closed form)", "",
              "| loss | run | estimate GiB | simulate GiB |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['loss']} | {r['run']} | {gib(r['estimate_bytes'])} | {gib(r['simulate_bytes'])} |"
              for r in steps]
    lines += ["", ("## 3. Longest sequence at batch 1 within 24 GiB (`fit --search seq_len --multiple-of 256 "
              "--confirm`)"), "",
              "| loss | run | longest seq (estimate) | estimate GiB | simulate GiB | simulate at +256 GiB |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for loss, rows in fits.items():
        lines += [f"| {loss} | {r['run']} | {r['largest']} | {gib(r['estimate_at_largest_bytes'])} "
                  f"| {gib(r['simulate_at_largest_bytes'])} | {gib(r['simulate_above_largest_bytes'])} |"
                  for r in rows]
    lines += ["", *notes(steps, fits), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_path_128k.md").write_text("\n".join(lines), encoding="utf-8")
    with open(out / "loss_path_128k.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["view", "loss", "what", "estimate_bytes", "traced_bytes"])
        for row in alone:
            est = dataclasses.asdict(row["estimate"])
            writer.writerow(["loss_path_alone", row["loss"], f"chunk_tokens={row['chunk_tokens']}",
                             est["backward_activations"] + est["backward_other"], row["traced_bytes"]])
        for r in steps:
            writer.writerow(["step", r["loss"], r["run"], r["estimate_bytes"], r["simulate_bytes"]])
        for loss, rows in fits.items():
            for r in rows:
                writer.writerow(["fit_seq_len", loss, f"{r['run']} longest={r['largest']}",
                                 r["estimate_at_largest_bytes"], r["simulate_at_largest_bytes"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
