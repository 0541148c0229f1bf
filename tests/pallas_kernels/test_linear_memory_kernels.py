"""Pallas kernels (TPU `tpu.py`, GPU `gpu.py`, run in interpret mode on CPU) held to the
token-by-token reference: outputs, final states and the gradient of every input, with
initial states, packed segments, one and several chunks, lengths that are not a multiple
of the chunk, float32 and bfloat16. Also: both kernels lower for their platform from this
CPU machine (`jax.export`), the `impl` dispatcher rules, and jit / grad / vmap.

Shapes are small because interpret mode runs the kernel body once per grid step in Python.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_memory
from pallas_kernels.linear_memory import api
from tests.pallas_kernels.lowering import lowering_target
from tests.pallas_kernels.test_linear_memory import (
    RULES,
    assert_close,
    call,
    differentiable_names,
    outputs_and_gradients,
)

# Tolerances, fixed once: max |actual - expected| <= TOL * max(1, max |expected|), per array.
# float32: kernel and reference differ by summation order and the forward substitution
# (observed <= 2e-6 on these inputs).
F32_TOL = 1e-5
# bfloat16 inputs: both sides see the same bf16-rounded inputs and compute in float32; the
# difference is the final rounding of o / the gradients to bf16 (2^-8 relative) + noise.
BF16_TOL = 1e-2

BATCH, HEADS, DIM, CHUNK = 2, 1, 16, 16
PLATFORMS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}

# name -> (public function, takes g, takes beta)


def make_inputs(seed, length, dtype=jnp.float32, dim=DIM, batch=BATCH):
    """Unit-norm q/k, β = sigmoid, g = -softplus with some near-complete forgetting."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, HEADS)

    def unit():
        x = rng.standard_normal(shape + (dim,))
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    g = -np.logaddexp(0.0, 2.0 * rng.standard_normal(shape))
    g = np.where(rng.uniform(size=shape) < 0.1, -12.0, g)
    inputs = dict(
        q=unit(),
        k=unit(),
        v=rng.standard_normal(shape + (dim,)),
        g=g,
        beta=1.0 / (1.0 + np.exp(-rng.standard_normal(shape))),
    )
    inputs = {name: jnp.asarray(x, jnp.float32).astype(dtype) for name, x in inputs.items()}
    state = 0.5 * rng.standard_normal((batch, HEADS, dim, dim))
    inputs["initial_state"] = jnp.asarray(state, jnp.float32)
    return inputs


def packed_segment_ids(length):
    """Row 0: boundaries inside chunks; row 1: a boundary on the chunk edge (t = CHUNK)."""
    row0 = np.zeros(length, np.int32)
    row0[length // 3 :] = 1
    row0[length - 5 :] = 2
    row1 = np.zeros(length, np.int32)
    row1[min(CHUNK, length // 2) :] = 1
    return jnp.asarray(np.stack([row0, row1]))


def assert_all_close(rule, actual, expected, tol):
    assert_close(actual[0], expected[0], tol, "o")
    assert_close(actual[1], expected[1], tol, "final_state")
    for name in differentiable_names(rule):
        assert_close(actual[2][name], expected[2][name], tol, f"d{name}")


@pytest.mark.parametrize("platform", list(PLATFORMS))
@pytest.mark.parametrize("rule", list(RULES))
def test_kernel_matches_reference_with_segments(platform, rule):
    """37 tokens = 3 chunks, the last padded; initial state; packed segments."""
    length = 37
    inputs = make_inputs(seed=length, length=length)
    segment_ids = packed_segment_ids(length)
    expected = outputs_and_gradients(rule, inputs, segment_ids=segment_ids, impl="reference")
    impl = PLATFORMS[platform]
    actual = outputs_and_gradients(
        rule, inputs, segment_ids=segment_ids, impl=impl, interpret=True, chunk_size=CHUNK
    )
    assert actual[0].dtype == jnp.float32 and actual[1].dtype == jnp.float32
    assert_all_close(rule, actual, expected, F32_TOL)


# One padded chunk; exactly two chunks without segments (chunk 32).
@pytest.mark.parametrize("length,chunk_size", [(11, 16), (64, 32)])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernel_single_and_exact_chunks(platform, length, chunk_size):
    rule = "gated_delta_rule"
    inputs = make_inputs(seed=length, length=length)
    expected = outputs_and_gradients(rule, inputs, impl="reference")
    actual = outputs_and_gradients(
        rule, inputs, impl=PLATFORMS[platform], interpret=True, chunk_size=chunk_size
    )
    assert_all_close(rule, actual, expected, F32_TOL)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernel_strong_decays_over_a_long_chunk(platform):
    """Log decays down to -40 per token over one 64-token chunk (cumulative ~ -1300): the
    pairwise decays must keep float32 accuracy (summed directly, not as G_i - G_j)."""
    rule, length = "gated_delta_rule", 64
    inputs = make_inputs(seed=9, length=length)
    decays = -np.random.default_rng(9).uniform(0, 40, inputs["g"].shape)
    inputs["g"] = jnp.asarray(decays, jnp.float32)
    expected = outputs_and_gradients(rule, inputs, impl="reference")
    actual = outputs_and_gradients(
        rule, inputs, impl=PLATFORMS[platform], interpret=True, chunk_size=64
    )
    assert_all_close(rule, actual, expected, F32_TOL)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernel_bfloat16_matches_float32_reference(platform):
    rule, length = "gated_delta_rule", 37
    inputs = make_inputs(seed=7, length=length, dtype=jnp.bfloat16)
    inputs_f32 = {name: x.astype(jnp.float32) for name, x in inputs.items()}
    segment_ids = packed_segment_ids(length)
    expected = outputs_and_gradients(rule, inputs_f32, segment_ids=segment_ids, impl="reference")
    actual = outputs_and_gradients(
        rule,
        inputs,
        segment_ids=segment_ids,
        impl=PLATFORMS[platform],
        interpret=True,
        chunk_size=CHUNK,
    )
    assert actual[0].dtype == jnp.bfloat16 and actual[1].dtype == jnp.float32
    for name in differentiable_names(rule):
        assert actual[2][name].dtype == inputs[name].dtype, name
    assert_all_close(rule, actual, expected, BF16_TOL)


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernel_under_vmap_jit_and_grad(platform):
    """An extra leading axis mapped with vmap (pallas_call's batching rule) over the value
    and gradient, inside jit, against the reference run example by example."""
    rule, length = "simple_gla", 20
    stacked = [make_inputs(seed=s, length=length, batch=1) for s in (1, 2)]
    inputs = {n: jnp.stack([x[n] for x in stacked]) for n in stacked[0]}
    names = differentiable_names(rule)

    def loss(differentiable, rest, impl, **kwargs):
        o, final_state = call(rule, {**rest, **differentiable}, impl=impl, **kwargs)
        return jnp.sum(jnp.sin(o)) + jnp.sum(final_state**2), (o, final_state)

    def split(x):
        return {n: x[n] for n in names}, {n: x[n] for n in x if n not in names}

    kernel_kwargs = dict(impl=PLATFORMS[platform], interpret=True, chunk_size=CHUNK)
    run = jax.jit(jax.vmap(lambda x: jax.grad(loss, has_aux=True)(*split(x), **kernel_kwargs)))
    grads, (o, final_state) = run(inputs)
    for i, single in enumerate(stacked):
        grads_ref, (o_ref, state_ref) = jax.grad(loss, has_aux=True)(
            *split(single), impl="reference"
        )
        assert_close(o[i], o_ref, F32_TOL, f"o[{i}]")
        assert_close(final_state[i], state_ref, F32_TOL, f"final_state[{i}]")
        for name in names:
            assert_close(grads[name][i], grads_ref[name], F32_TOL, f"d{name}[{i}]")


def _export_args(dtype):
    batch, length, heads, dim = 2, 256, 2, 128
    token = jax.ShapeDtypeStruct((batch, length, heads, dim), dtype)
    gate = jax.ShapeDtypeStruct((batch, length, heads), jnp.float32)
    state = jax.ShapeDtypeStruct((batch, heads, dim, dim), jnp.float32)
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return (token, token, token, gate, gate, state, segments)


# The Triton custom call has no export-stability guarantee; the target name is what jax
# 0.10 emits for Pallas Triton kernels.
_TRITON_TARGET = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernels_lower_for_their_platform(platform, dtype):
    """Forward and backward (value and grad) export for TPU / CUDA from this CPU machine."""
    impl = PLATFORMS[platform]

    def loss(q, k, v, g, beta, initial_state, segment_ids):
        o, final_state = linear_memory.gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
            segment_ids=segment_ids, impl=impl, chunk_size=64,
        )  # fmt: skip
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final_state)

    export_platform = "tpu" if platform == "tpu" else "cuda"
    checks = (
        [] if platform == "tpu" else [jax.export.DisabledSafetyCheck.custom_call(_TRITON_TARGET)]
    )
    with lowering_target(platform):
        exported = jax.export.export(
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))),
            platforms=[export_platform],
            disabled_checks=checks,
        )(*_export_args(dtype))
    text = exported.mlir_module()
    marker = "tpu_custom_call" if platform == "tpu" else _TRITON_TARGET
    assert text.count(marker) == 2, "expected one forward and one backward kernel"


def test_tpu_kernel_lowers_under_vmap():
    """Mosaic lowering of the vmapped kernel (vmap adds a grid axis the compiler params must
    cover; the interpret-mode vmap test above does not exercise that)."""

    def run(q, k, v, g, beta, initial_state, segment_ids):
        return linear_memory.gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
            segment_ids=segment_ids, impl="pallas_tpu", chunk_size=64,
        )  # fmt: skip

    stacked = [jax.ShapeDtypeStruct((3, *x.shape), x.dtype) for x in _export_args(jnp.float32)]
    text = jax.export.export(jax.jit(jax.vmap(run)), platforms=["tpu"])(*stacked).mlir_module()
    assert text.count("tpu_custom_call") == 1


# Dispatcher rules: (backend, impl, Dk = Dv, chunk, dtype, interpret) -> what runs.
DISPATCH_CASES = [
    ("cpu", "auto", 128, 64, jnp.float32, False, "chunked"),
    ("tpu", "auto", 128, 64, jnp.float32, False, "tpu"),
    ("tpu", "auto", 256, 32, jnp.bfloat16, False, "tpu"),
    ("tpu", "auto", 64, 64, jnp.float32, False, "chunked"),  # Dk not a multiple of 128
    ("tpu", "auto", 128, 24, jnp.float32, False, "chunked"),  # chunk not a multiple of 16
    ("tpu", "auto", 128, 64, jnp.float16, False, "chunked"),  # dtype not covered
    ("gpu", "auto", 64, 64, jnp.float32, False, "gpu"),
    ("gpu", "auto", 256, 64, jnp.float32, False, "chunked"),  # state too big for registers
    ("gpu", "auto", 64, 128, jnp.float32, False, "chunked"),  # chunk above 64
    ("gpu", "auto", 48, 64, jnp.float32, False, "chunked"),  # not a power of 2
    ("tpu", "auto", 128, 64, jnp.float32, True, "tpu"),  # auto ignores interpret
    ("tpu", "pallas", 16, 16, jnp.float32, False, "tpu"),
    ("gpu", "pallas", 16, 16, jnp.float32, False, "gpu"),
    ("cpu", "pallas", 16, 16, jnp.float32, True, "tpu"),  # CPU + interpret: TPU kernel
    ("cpu", "pallas", 16, 16, jnp.float32, False, "error"),
    ("cpu", "pallas_tpu", 16, 16, jnp.float32, False, "tpu"),  # forced, any backend
    ("tpu", "pallas_gpu", 16, 16, jnp.float32, False, "gpu"),
    ("cpu", "pallas_gpu", 24, 16, jnp.float32, False, "error"),  # Triton: powers of 2
    ("cpu", "pallas_tpu", 16, 24, jnp.float32, False, "error"),
    ("cpu", "pallas_tpu", 16, 16, jnp.float16, False, "error"),
]


@pytest.mark.parametrize("backend,impl,dim,chunk,dtype,interpret,expected", DISPATCH_CASES)
def test_dispatch_rules(monkeypatch, backend, impl, dim, chunk, dtype, interpret, expected):
    calls = []

    def fake(name):
        def run(q, k, v, g, beta, **kwargs):
            calls.append((name, kwargs.get("interpret")))
            return jnp.zeros_like(v), kwargs["initial_state"]

        return run

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(api, "_kernels", {"tpu": fake("tpu"), "gpu": fake("gpu")})
    monkeypatch.setattr(api, "_chunked", fake("chunked"))
    token = jnp.zeros((1, 4, 1, dim), dtype)
    gate = jnp.zeros((1, 4, 1), jnp.float32)
    args = (token, token, token, gate, gate)
    kwargs = dict(initial_state=jnp.zeros((1, 1, dim, dim)), chunk_size=chunk, impl=impl)
    if expected == "error":
        with pytest.raises(ValueError, match=impl):
            linear_memory.gated_delta_rule(*args, **kwargs, interpret=interpret)
        return
    linear_memory.gated_delta_rule(*args, **kwargs, interpret=interpret)
    assert [name for name, _ in calls] == [expected]
    if expected != "chunked":
        # Only an explicit Pallas impl may run a kernel in interpret mode.
        assert calls[0][1] == (interpret and impl != "auto")


def _kernel_dot_precisions(jaxpr, inside_kernel=False):
    """Precision of every dot_general inside a pallas_call body, searching all sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if inside_kernel and eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        in_kernel = inside_kernel or eqn.primitive.name == "pallas_call"
        for sub in _params_jaxprs(eqn.params.values()):
            found.extend(_kernel_dot_precisions(sub, in_kernel))
    return found


def _params_jaxprs(values):
    for value in values:
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax.extend.core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _params_jaxprs(value)


def test_gpu_kernel_dots_ask_for_full_float32():
    """Pallas Triton lowers float32 dots with precision None / DEFAULT / HIGH as TF32 (10-bit
    mantissa), far outside the 1e-5 the interpret tests hold the kernel to; the export
    cannot show it, so check that every dot inside the GPU kernels asks for HIGHEST."""

    def loss(q, k, v, g, beta, initial_state, segment_ids):
        o, _ = linear_memory.gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True,
            segment_ids=segment_ids, impl="pallas_gpu", chunk_size=64,
        )  # fmt: skip
        return jnp.sum(o)

    args = [jnp.zeros(a.shape, a.dtype) for a in _export_args(jnp.float32)]
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args).jaxpr
    precisions = _kernel_dot_precisions(jaxpr)
    assert len(precisions) > 4  # forward and backward kernels
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions), set(precisions)
