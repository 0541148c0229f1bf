"""`benchmarks.step_timing.interleaved_medians`: one step of every variant per round, the
order reversed every other round, each variant's state carried from its previous step."""

import itertools

import jax.numpy as jnp

from benchmarks.step_timing import interleaved_medians


def test_rounds_alternate_their_order_and_carry_each_variant_state():
    calls = []

    def variant(label):
        def step(state, batch):
            calls.append(label)
            return state + 1, {"loss": jnp.float32(batch)}

        return [step, 0, itertools.count(), 128]

    runs = {label: variant(label) for label in ("a", "b", "c")}
    medians = interleaved_medians(runs, rounds=4)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert {label: run[1] for label, run in runs.items()} == {"a": 4, "b": 4, "c": 4}
    assert set(medians) == {"a", "b", "c"}
    assert all(seconds >= 0 and tokens == 128 for seconds, tokens in medians.values())
