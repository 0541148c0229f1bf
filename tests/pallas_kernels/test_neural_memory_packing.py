"""Packed rows for the deep memory (`segments`): every document restarts the memory.

Two references that cannot share the chunked form's masking: the token-by-token scans with
a state reset at each document start (`reference.chunk_start_scan` / `exact_scan` with
segment_ids), and the documents run alone, one call each, from the same initial state.
The layouts put document starts mid-chunk, several in one chunk, a one-token document and
a start on the chunk grid; the Omega-rule models (atlas, omeganet) check that the window
forgets the previous document, the momentum ones that the momentum restarts.

CI holds the chunked form to the reset scan for the choices that exercise distinct code
(the linear chunk step: titans; the materialised one with the Omega window and muon: atlas;
kl's normalisation: memora (eq. 27's chunk); lq read at its chunk-start norm), and runs the
documents-alone and gradient checks on titans; the rest are `slow`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import MemorySpec, chunked, init_state, neural_memory, reference
from tests.pallas_kernels.test_neural_memory import F32_TOL, GRAD_TOL, max_relative_error
from tests.pallas_kernels.test_neural_memory_choices import MODELS, SINGLE_CHOICES, make_inputs

SPECS = {
    "titans": MemorySpec(),
    "matrix-gd": MemorySpec(architecture="matrix", rule="gd"),
    "atlas-huber": MemorySpec(bias="huber", omega_window=3, rule="muon"),
    "omeganet-pair-gates": MemorySpec(omega_window=3, omega_gates="pair", rule="gd"),
    # every model's choices but Memora's lag-token chunk, which refuses packed rows (below)
    **{name: spec for name, spec in MODELS.items() if not spec.lag_token_chunk},
    "memora-exact": SINGLE_CHOICES["memora-exact"],
    "moneta-token-normaliser": SINGLE_CHOICES["moneta-token-normaliser"],
}
IN_CI = {"titans", "atlas", "memora-exact", "moneta", "omeganet-pair-gates"}
CHUNK = 4
# Row 0: starts at 3, 4, 6 (mid-chunk, two in one chunk, a one-token document) and 12 (on
# the grid); row 1: documents on the grid of 4 (the case where packed equals run alone).
DOCUMENTS = ([3, 1, 2, 6, 5], [8, 4, 5])
SEQ_LEN = 17


def segment_ids(documents=DOCUMENTS):
    rows = [np.repeat(np.arange(len(lengths)), lengths) for lengths in documents]
    return jnp.asarray(np.stack(rows), jnp.int32)


def specs(names, in_ci=IN_CI):
    """pytest params for `names`, the ones not in `in_ci` marked slow."""
    return [pytest.param(name, marks=() if name in in_ci else pytest.mark.slow) for name in names]


def fresh_state(spec, state, batch):
    """`init_state` (zero momentum, empty window) from row 0's weights of `state`."""
    return init_state(spec, {n: leaf[0] for n, leaf in state.weights.items()}, batch)


@pytest.mark.parametrize("name", specs(sorted(SPECS)))
def test_chunked_matches_the_reset_scan(name):
    """Packed chunked == the chunk-start scan with resets; and it is not the unpacked run."""
    spec = SPECS[name]
    inputs, state = make_inputs(spec, SEQ_LEN, seed=1)  # nonzero momentum and window at t=0
    ids = segment_ids()
    expected = jax.jit(lambda x, s: reference.chunk_start_scan(spec, x, s, CHUNK, segment_ids=ids))(
        inputs, state
    )
    actual = jax.jit(lambda x, s: chunked.chunked_scan(spec, x, s, CHUNK, ids))(inputs, state)
    assert max_relative_error(actual, expected) < F32_TOL
    unpacked, _ = jax.jit(lambda x, s: chunked.chunked_scan(spec, x, s, CHUNK))(inputs, state)
    assert max_relative_error(unpacked[:, 3:], actual[0][:, 3:]) > 100 * F32_TOL


def run_alone(spec, inputs, state, rows, chunk_size, impl):
    """The documents of `rows` (indices into DOCUMENTS) as separate calls from
    `fresh_state` -> o [len(rows), T, H, Dv]."""
    outputs_by_row = []
    for row in rows:
        start, outputs = 0, []
        lengths = DOCUMENTS[row]
        for length in lengths:
            rows, tokens = slice(row, row + 1), slice(start, start + length)
            piece = inputs.map(lambda name, x, rows=rows, tokens=tokens: x[rows, tokens])
            o, _ = neural_memory(
                piece, memory=spec, initial_state=fresh_state(spec, state, 1),
                chunk_size=chunk_size, impl=impl,
            )  # fmt: skip
            outputs.append(o)
            start += length
        outputs_by_row.append(jnp.concatenate(outputs, axis=1))
    return jnp.concatenate(outputs_by_row, axis=0)


@pytest.mark.parametrize("name", specs(["titans", "atlas", "moneta", "yaad"], in_ci={"titans"}))
def test_packed_rows_equal_documents_run_alone(name):
    """Exact rule: any layout. Chunk 4: documents on the grid (row 1)."""
    spec = SPECS[name]
    inputs, state = make_inputs(spec, SEQ_LEN, seed=2)
    start = fresh_state(spec, state, 2)
    ids = segment_ids()
    exact, _ = neural_memory(
        inputs, memory=spec, initial_state=start, impl="reference", segment_ids=ids
    )
    alone = run_alone(spec, inputs, state, [0, 1], 1, "reference")
    assert max_relative_error(exact, alone) < F32_TOL
    packed, _ = neural_memory(
        inputs, memory=spec, initial_state=start, chunk_size=CHUNK, segment_ids=ids
    )
    alone = run_alone(spec, inputs, state, [1], CHUNK, "chunked")
    assert max_relative_error(packed[1:], alone) < F32_TOL


@pytest.mark.parametrize("name", specs(["titans", "atlas-huber", "memora-exact"], in_ci={"titans"}))
def test_packed_gradients_match_the_reset_scan(name):
    """d(random functional of outputs and final state) / d(every input, initial weights)."""
    spec = SPECS[name]
    inputs, state = make_inputs(spec, SEQ_LEN, seed=3)
    initial_weights = {n: leaf[0] for n, leaf in state.weights.items()}
    ids = segment_ids()

    def loss(run, inputs, initial_weights):
        rng = np.random.default_rng(4)  # the same probes for both runs
        output, final = run(inputs, init_state(spec, initial_weights, 2))
        leaves = [output] + jax.tree.leaves(final)
        probes = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves]
        return sum(jnp.sum(x * p) for x, p in zip(leaves, probes))

    runs = (
        lambda x, s: reference.chunk_start_scan(spec, x, s, CHUNK, segment_ids=ids),
        lambda x, s: chunked.chunked_scan(spec, x, s, CHUNK, ids),
    )
    expected, actual = (
        jax.jit(jax.grad(lambda x, w, run=run: loss(run, x, w), argnums=(0, 1)))(
            inputs, initial_weights
        )
        for run in runs
    )
    for key in list(inputs.named()) + ["initial"]:
        e = expected[1] if key == "initial" else expected[0].named()[key]
        a = actual[1] if key == "initial" else actual[0].named()[key]
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(a)), key
        assert max_relative_error(a, e) < GRAD_TOL, key


def test_api_checks_segment_ids_and_kernels_refuse_them():
    spec = SPECS["titans"]
    inputs, state = make_inputs(spec, SEQ_LEN, seed=5)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        neural_memory(inputs, memory=spec, initial_state=state, segment_ids=segment_ids()[:, :5])
    with pytest.raises(ValueError, match="dtype"):
        neural_memory(
            inputs, memory=spec, initial_state=state, segment_ids=segment_ids().astype(float)
        )
    with pytest.raises(ValueError, match="segment_ids"):
        neural_memory(
            inputs, memory=spec, initial_state=state, impl="pallas_tpu", interpret=True,
            segment_ids=segment_ids(),
        )  # fmt: skip


def test_lag_token_chunk_refuses_packed_rows():
    """Memora's lag-token chunk has one lag token per chunk, so a document starting mid-chunk
    has none: packed rows are refused by name, in the chunked form and its oracle."""
    spec = MemorySpec(retention="kl", kl_chunk_form="lag_token", rule="gd")
    inputs, state = make_inputs(spec, SEQ_LEN, seed=1)
    with pytest.raises(ValueError, match="lag_token"):
        chunked.chunked_scan(spec, inputs, state, CHUNK, segment_ids=segment_ids())
    with pytest.raises(ValueError, match="lag_token"):
        reference.chunk_start_scan(spec, inputs, state, CHUNK, segment_ids=segment_ids())
