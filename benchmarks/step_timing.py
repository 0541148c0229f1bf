"""Training steps timed side by side: compile each variant, then time one step of every
variant in turn for a number of rounds (interleaved, so drift of the machine hits them
alike; the order reversed every other round) and take medians. Used by
`miras_parallel_forms` and `cpu_layouts`."""

import statistics
import time

import jax

from benchmarks.throughput import SIZES, build_step
from configs import base
from training import config_validation


def compiled_step(kind, size, overrides, steps):
    """[compiled step, state, batch iterator, tokens per step] of one variant, warmed up.

    size: a `benchmarks.throughput.SIZES` key; overrides: options of model.<kind>."""
    config = SIZES[size](kind, steps + 2)
    for key, value in overrides.items():
        config.model[kind][key] = value
    config = config_validation.validate(config, base.get_config())
    step, state, batches = build_step(config)
    batch = next(batches)
    compiled = step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return [compiled, state, batches, config.train.batch_size * config.data.seq_len]


def interleaved_medians(runs, rounds):
    """runs {label: `compiled_step` result} -> {label: (median s per step, tokens per step)}.

    Every other round runs the variants in reverse order, so no variant always runs first
    after another kind's step (on one core the first step after a switch ran up to 10%
    slower: attention's two identical variants timed 0.90x in a fixed order)."""
    times = {label: [] for label in runs}
    labels = list(runs)
    for round_index in range(rounds):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            run = runs[label]
            compiled, state, batches, _ = run
            batch = next(batches)
            jax.block_until_ready(batch)
            begin = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times[label].append(time.perf_counter() - begin)
            run[1] = state
    return {label: (statistics.median(times[label]), runs[label][3]) for label in runs}
