"""BAdam's memory changes with the block it trains: the estimate and simulate take the largest block the run
reaches (methods/badam.phases), and a real run through every block peaks where they say."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_galore_optim import tiny_llama

from galore_bench.measure import training
from galore_bench.measure.estimate import estimate, estimate_run
from galore_bench.methods.badam import phases, switch_steps
from galore_bench.models import ZOO
from galore_bench.optim.badam import BlockAdam, blocks_trained, decoder_blocks
from galore_bench.spec.scenario import load_scenario

STEPS = 7


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize(("mode", "include"), [("ascending", False), ("descending", False), ("random", False),
                                               ("descending", True), ("random", True)])
def test_the_replayed_order_and_switch_steps_are_the_optimizers(mode, include, every):
    """What the estimate replays (blocks_trained, switch_steps) against the optimizer's own steps."""
    model = tiny_llama(torch.float32)
    flags = {"include_embedding": include, "include_lm_head": include}
    opt = BlockAdam(model, lambda params: torch.optim.SGD(params), lr=1e-3, switch_every=every, switch_mode=mode,
                    seed=5, **flags)
    ids = torch.randint(0, 128, (1, 8))
    active, switched = [], set()
    for step in range(STEPS):
        active.append(opt.active_block)
        model(input_ids=ids, labels=ids).loss.backward()
        before = len(opt.visited)
        opt.step()
        if len(opt.visited) > before:
            switched.add(step)
    assert active == blocks_trained(len(decoder_blocks(model, **flags)), mode, None, 5, every, STEPS)
    assert switched == switch_steps({"switch_every": every}, STEPS)["block_switch"]


SEQ = 2048  # long enough that saved activations decide the peak (at 256 the step's own peak is the same for all)


def _estimate(options: dict) -> int:
    return estimate(ZOO["7b"], "badam", options, batch_size=1, seq_len=SEQ, dtype="bf16").peak_bytes


def _scenario(steps: int, **options):
    scenario = load_scenario("successors_7b")
    run = next(r for r in scenario.runs if r.method == "badam")
    run = dataclasses.replace(run, options={**run.options, **options}, model=scenario.model)
    return dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, steps=steps, seq_len=SEQ)), run


def test_the_estimate_is_the_largest_block_the_run_trains():
    """Descending from layer 31: a short run trains only the top layers (least saved below them); a long one
    reaches layer 0, whose peak is the run's. The embedding block, when trained, outweighs any layer."""
    short, run = _scenario(29, switch_mode="descending", switch_every=10)  # 31 (9 steps), 30, 29 (10 each)
    result = estimate_run(short, run)
    assert result.phase == "block 29 (layer 29)"
    assert result.peak_bytes == _estimate({"start_block": 29})
    long, run = _scenario(400, switch_mode="descending", switch_every=10)
    result = estimate_run(long, run)
    assert result.phase == "block 0 (layer 0)"
    assert result.peak_bytes == _estimate({"start_block": 0}) > _estimate({"start_block": 31})
    both, run = _scenario(400, switch_mode="descending", switch_every=10, include_embedding=True,
                          include_lm_head=True)
    result = estimate_run(both, run)
    labels = {"block 0 (the embedding)": 0, "block 1 (layer 0)": 1, "block 33 (final norm and LM head)": 33}
    assert set(phases(ZOO["7b"], run.options, 400, 0)) == set(labels)
    peaks = {label: _estimate({"start_block": i, "include_embedding": True, "include_lm_head": True})
             for label, i in labels.items()}
    assert result.peak_bytes == max(peaks.values()) and peaks[result.phase] == result.peak_bytes
    assert len(set(peaks.values())) == 3  # three different peaks: the choice matters


def test_a_real_run_through_every_block_peaks_where_simulate_traces(write_scenario):
    """A real CPU run that starts at the top layer and reaches layer 0 (descending, a switch every 2 steps),
    tracked over all its steps, against simulate's trace of the largest block (exact bytes, both): the same peak.
    Tracing the starting block instead (what simulate did before) falls short by layer 0's extra saves."""
    path = write_scenario('[model]\nsize = "tiny"\n[train]\nbatch_size = 2\nseq_len = 32\ndtype = "fp32"\nsteps = 6\n'
                          '[[runs]]\nmethod = "badam"\nimpl = "for-loop"\nswitch_mode = "descending"\n'
                          'switch_every = 2\n')
    scenario = load_scenario(str(path))
    run = scenario.runs[0]
    real = training.train_steps(scenario, run, fake=False, device="cpu", steps=6, round_to=1, track_steps=6)
    planned, steps = training.simulation_plan(scenario, run)
    assert planned.options["start_block"] == 0
    traced = training.train_steps(scenario, planned, fake=True, device="cpu", steps=steps, round_to=1)
    start = dataclasses.replace(run, options={**run.options, "switch_every": 5})  # held at the top layer
    at_start = training.train_steps(scenario, start, fake=True, device="cpu", steps=steps, round_to=1)
    assert real["tracker"].peak == traced["tracker"].peak > at_start["tracker"].peak
