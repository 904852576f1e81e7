"""Randomized vs full-SVD GaLore projector refresh: speed, distance to the exact basis, effect on loss (CPU).

Writes reports/cpu-measure/galore_refresh.md and galore_refresh.csv (one row per measurement). Three parts:
  speed + subspace: one refresh on real-text gradients (at initialization) of 1B-shaped matrices (a 1-layer
      LLaMA at the 1B width, 3072 tokens) and of the small model below; median seconds, one intra-op thread.
  subspace during training: at every refresh of the full-SVD run, the randomized basis of the same gradient.
  loss: the same short pre-training run with svd="full" and with svd="randomized".
Run: PYTHONPATH=. python scripts/galore_refresh.py   (about 12 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from galore_bench.data import TokenBatches, evaluate_perplexity
from galore_bench.methods.galore import GALORE_OPTIONS, projected_groups
from galore_bench.models import ModelShape, build_model
from galore_bench.optim.galore import GaLoreAdamW
from galore_bench.optim.projector import SVD_OVERSAMPLE, SVD_POWER_ITERS, GaLoreProjector

# The ppl_cpu scenario's model and data (hidden 128, 4 layers, the 32k tokenizer, offline Wikipedia).
SMALL = ModelShape(128, 344, 4, 4, 32000, source="ppl_cpu scenario model")
WIDE_1B = ModelShape(2048, 5461, 1, 32, 32000, source="1B width, 1 layer")
WIDE_NAMES = ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight")
RANDOMIZED = [
    (SVD_OVERSAMPLE, 0),
    (SVD_OVERSAMPLE, 1),
    (SVD_OVERSAMPLE, SVD_POWER_ITERS),
    (2 * SVD_OVERSAMPLE, 2),
]
NOTES = "<!-- hand-written below: kept when the script rewrites the tables above -->"
FIELDS = [
    "part",
    "seed",
    "matrix",
    "shape",
    "rank",
    "svd",
    "oversample",
    "power_iters",
    "seconds",
    "ratio_to_full",
    "sin_max_angle",
    "energy_kept",
    "step",
    "train_loss",
    "val_loss",
    "val_ppl",
]


def _basis(
    grad: torch.Tensor, rank: int, svd: str, oversample: int = 0, power_iters: int = 0
) -> torch.Tensor:
    projector = GaLoreProjector(rank, svd=svd, svd_oversample=oversample, svd_power_iters=power_iters)
    projector.project(grad, 0)
    basis = projector.ortho_matrix
    return basis.T if projector.side == "right" else basis  # columns span the kept subspace


def _compare(grad: torch.Tensor, exact: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """sin of the largest principal angle between the spans, and the gradient energy the basis keeps vs exact.

    Bases are column bases of grad (left side) or of grad^T (right side: 'std' on a rows >= cols matrix).
    """
    cosines = torch.linalg.svdvals(exact.T @ approx)
    oriented = grad.T if grad.shape[0] >= grad.shape[1] else grad  # 'std' keeps the smaller side's vectors
    kept = (approx.T @ oriented).norm() ** 2 / (exact.T @ oriented).norm() ** 2
    return {"sin_max_angle": math.sqrt(max(0.0, 1.0 - cosines.min().item() ** 2)), "energy_kept": kept.item()}


def _timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _grads(shape: ModelShape, names: tuple[str, ...], micro_batches: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of a few weights of `shape`, summed over micro-batches of 4 x 256 real-text tokens (fp32).

    A weight's gradient has rank <= the tokens behind it: 2048-wide matrices need > 2048 tokens for full rank.
    """
    model = build_model(shape, "fp32", seed=0)
    batches = iter(TokenBatches.from_corpus("train", 256, 4, seed=0))
    for _ in range(micro_batches):
        batch = next(batches)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n in names}


def speed_and_subspace(grads: dict[str, torch.Tensor], rank: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, grad in grads.items():
        base = {"part": "speed", "matrix": name, "shape": "x".join(map(str, grad.shape)), "rank": rank}
        full_s, exact = _timed(lambda g=grad: _basis(g, rank, "full"), repeats)
        rows.append(
            {
                **base,
                "svd": "full",
                "seconds": full_s,
                "ratio_to_full": 1.0,
                "sin_max_angle": 0.0,
                "energy_kept": 1.0,
            }
        )
        for oversample, iters in RANDOMIZED:
            seconds, approx = _timed(
                lambda g=grad, o=oversample, i=iters: _basis(g, rank, "randomized", o, i), repeats
            )
            rows.append(
                {
                    **base,
                    "svd": "randomized",
                    "oversample": oversample,
                    "power_iters": iters,
                    "seconds": seconds,
                    "ratio_to_full": seconds / full_s,
                    **_compare(grad, exact, approx),
                }
            )
        print(rows[-1], flush=True)
    return rows


def train(
    svd: str, steps: int, gap: int, rank: int, seed: int, measure_every_refresh: bool
) -> list[dict[str, Any]]:
    """The short pre-training run; in the full run, also the randomized basis at every refresh."""
    model = build_model(SMALL, "fp32", seed=seed)
    opts = {**{k: v.default for k, v in GALORE_OPTIONS.items()}, "rank": rank, "update_proj_gap": gap}
    groups = projected_groups(model, opts)
    groups[1]["svd"] = svd
    optimizer = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.0)
    batches = TokenBatches.from_corpus("train", 64, 8, seed=seed).forever()
    held_out = [b for _, b in zip(range(16), TokenBatches.from_corpus("validation", 64, 8))]
    names = {p: n for n, p in model.named_parameters()}
    rows, losses = [], []
    for step in range(steps):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        if measure_every_refresh and step % gap == 0:
            for p in groups[1]["params"]:
                exact = _basis(p.grad, rank, "full")
                approx = _basis(p.grad, rank, "randomized", SVD_OVERSAMPLE, SVD_POWER_ITERS)
                rows.append(
                    {
                        "part": "training-refresh",
                        "seed": seed,
                        "matrix": names[p].removeprefix("model."),
                        "step": step,
                        "shape": "x".join(map(str, p.shape)),
                        "rank": rank,
                        "svd": "randomized",
                        "oversample": SVD_OVERSAMPLE,
                        "power_iters": SVD_POWER_ITERS,
                        **_compare(p.grad, exact, approx),
                    }
                )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    val = evaluate_perplexity(model, held_out)
    print(svd, seed, losses[-1], val, flush=True)
    rows.append(
        {
            "part": "loss",
            "seed": seed,
            "svd": svd,
            "rank": rank,
            "step": steps,
            "oversample": SVD_OVERSAMPLE,
            "power_iters": SVD_POWER_ITERS,
            "train_loss": statistics.mean(losses[-20:]),
            "val_loss": val["nll"],
            "val_ppl": val["perplexity"],
        }
    )
    return rows


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """The report: every measured row of the speed part, the training refreshes summarized, the loss rows."""
    speed = [r for r in rows if r["part"] == "speed"]
    refreshes = [r for r in rows if r["part"] == "training-refresh"]
    losses = [r for r in rows if r["part"] == "loss"]
    cols = FIELDS[FIELDS.index("matrix") : FIELDS.index("energy_kept") + 1]  # the speed part's columns
    lines = [
        "# GaLore projector refresh: randomized range finder vs full SVD",
        "",
        f"Measured {meta['date']} on {meta['machine']}. Command: `{meta['command']}`.",
        (
            "Raw rows: galore_refresh.csv. `energy_kept` = ||B^T G||^2 / ||P^T G||^2 (P: the full "
            "SVD's top-r basis, B: the randomized one; 1 = as good as exact); `sin_max_angle` = sine of the "
            "largest "
            "principal angle between the two spans (1 when singular values around r are close: the exact span "
            "is then itself unstable)."
        ),
        "",
        "## One refresh: time and distance to the exact basis",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + " --- |" * len(cols),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in speed]
    lines += [
        "",
        f"## During training: every refresh of the full-SVD run ({len(refreshes)} matrix refreshes)",
        "",
        (
            "The randomized basis (default oversample and power iterations) of the very gradient the full "
            "SVD refreshed from."
        ),
        "",
        "| matrix kind | refreshes | energy_kept min | median | sin_max_angle median |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    kinds = sorted({r["matrix"].rsplit(".", 2)[-2] for r in refreshes})
    for kind in kinds:
        mine = [r for r in refreshes if r["matrix"].rsplit(".", 2)[-2] == kind]
        kept = [r["energy_kept"] for r in mine]
        lines.append(
            f"| {kind} | {len(mine)} | {min(kept):.4f} | {statistics.median(kept):.4f} | "
            f"{statistics.median(r['sin_max_angle'] for r in mine):.3f} |"
        )
    lines += [
        "",
        f"## Loss: the same run with each refresh ({meta['steps']} steps, refresh every {meta['gap']})",
        "",
        "| seed | svd | train loss (mean of last 20 steps) | validation loss | validation perplexity |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['seed']} | {r['svd']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.1f} |"
        for r in losses
    ]
    notes = path.read_text().partition(NOTES)[2] if path.exists() else ""  # the hand-written reading stays
    path.write_text("\n".join(lines) + "\n\n" + NOTES + (notes or "\n## Reading\n\n(to be written)\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/cpu-measure/galore_refresh")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gap", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wide = _grads(WIDE_1B, WIDE_NAMES, micro_batches=3)  # 3072 tokens
    rows = speed_and_subspace(wide, 512, args.repeats)
    del wide
    for seed in range(args.seeds):  # model init and data order; the spread between seeds is the noise level
        rows += train("full", args.steps, args.gap, 32, seed, measure_every_refresh=seed == 0)
        rows += train("randomized", args.steps, args.gap, 32, seed, measure_every_refresh=False)
    small = _grads(SMALL, ("model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.up_proj.weight"))
    rows += speed_and_subspace(small, 32, 5 * args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(
            [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
        )
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_name()} ({os.cpu_count()} cores, shared), "
        f"{torch.get_num_threads()} intra-op thread, torch {torch.__version__}",
        "steps": args.steps,
        "gap": args.gap,
        "command": f"PYTHONPATH=. python scripts/galore_refresh.py --steps {args.steps} "
        f"--gap {args.gap} --repeats {args.repeats} --seeds {args.seeds}",
    }
    write_markdown(rows, meta, out.with_suffix(".md"))
    print(meta)


if __name__ == "__main__":
    main()
