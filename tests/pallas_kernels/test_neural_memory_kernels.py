"""Deep-memory Pallas kernels (TPU `tpu.py`, GPU `gpu.py`, run in interpret mode on CPU) held
to the plain-JAX chunked form `chunked.chunked_scan`: outputs, final memory and momentum,
and the gradient of every input (q, k, v, theta, eta, g, initial weights and momentum), with
initial states, one and several chunks, lengths that are not a multiple of the chunk,
float32 and bfloat16, under jit and vmap. Also: both kernels lower forward and backward for
their platform from this CPU machine (`jax.export`), and the dispatcher rules of
`kernel_api` (kernel_platform_for_auto / kernel_rejects).

Shapes are tiny because interpret mode runs the kernel body once per grid step in Python.
Inputs follow the default-like regime of test_neural_memory.py (unit-norm q/k, theta =
0.05 sigmoid, eta = sigmoid, g = -softplus(. - 4), weights ~ N(0, 1/d_in), a nonzero
initial momentum), plus a strong-decay case with exact eta = 0 tokens.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import chunked, kernel_api, kernel_common, kernel_math
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs
from tests.pallas_kernels.lowering import lowering_target

# Tolerances, fixed once: max |actual - expected| <= TOL * max(1, max |expected|), per array.
# float32: kernel and chunked form differ by summation order, the products-of-factors
# coefficients (vs exp of cumulative sums) and the rational erf (|error| < 5e-7 vs lax.erf);
# observed <= 2e-6 on these inputs for outputs, states and gradients alike.
F32_TOL = 1e-5
# bfloat16 inputs: both sides see the same bf16-rounded inputs and compute in float32; the
# difference is the final rounding of o and of dq / dk / dv to bf16 (2^-8 relative).
BF16_TOL = 1e-2

TITANS = MemorySpec()  # mlp depth 2, expansion 2, GELU, l2, gated_decay, momentum
PLATFORMS = ("tpu", "gpu")
INPUT_NAMES = ("q", "k", "v", "lr", "eta", "g", "initial_state")


def make_inputs(seed, batch, length, heads, dim, spec=TITANS, strong_decay=False):
    """(q, k, v, lr, eta, g, initial_state), all float32."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    tokens, per_token = (batch, length, heads, dim), (batch, length, heads)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    eta = sigmoid(normal(*per_token))
    g = -np.logaddexp(0.0, normal(*per_token) - 4.0)
    if strong_decay:  # near-complete forgetting and momentum resets, exactly 0 eta included
        g = np.where(rng.uniform(size=per_token) < 0.2, -8.0, g)
        eta = np.where(rng.uniform(size=per_token) < 0.2, 0.0, eta)
    shapes = spec.weight_shapes(dim, dim)
    weights = {n: normal(batch, heads, *s) / np.sqrt(s[0]) for n, s in shapes.items()}
    momentum = {n: 0.1 * normal(batch, heads, *s) for n, s in shapes.items()}
    arrays = (unit(normal(*tokens)), unit(normal(*tokens)), normal(*tokens))
    arrays += (0.05 * sigmoid(normal(*per_token)), eta, g)
    state = NeuralMemoryState(weights, momentum)
    return tuple(jax.tree.map(jnp.asarray, arrays + (state,)))


def chunked_fn(spec, chunk_size):
    def run(*inputs):  # (q, k, v, lr, eta, g, state), the kernels' own layout
        return chunked.chunked_scan(spec, MemoryInputs(*inputs[:6]), inputs[6], chunk_size)

    return run


def kernel_fn(spec, chunk_size, platform, interpret=True):
    def run(*inputs):
        return kernel_api.run_kernel(
            spec, MemoryInputs(*inputs[:6]), inputs[6], chunk_size=chunk_size,
            platform=platform, interpret=interpret,
        )  # fmt: skip

    return run


def value_and_vjp(run, inputs, seed=0):
    """((o, final_state), gradients of every input) for fixed random output cotangents."""
    outputs, pullback = jax.vjp(run, *inputs)
    rng = np.random.default_rng(seed + 1000)
    cotangents = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32).astype(x.dtype),
        outputs,
    )
    return outputs, pullback(cotangents)


def assert_close(actual, expected, tol, name):
    actual, expected = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (actual, expected))
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error = np.max(np.abs(actual - expected))
    bound = tol * max(1.0, float(np.max(np.abs(expected))))
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def assert_all_close(actual, expected, tol):
    (o, state), grads = actual
    (o_ref, state_ref), grads_ref = expected
    assert_close(o, o_ref, tol, "o")
    for part in ("weights", "momentum"):
        for leaf in ("W1", "W2"):
            got, want = getattr(state, part)[leaf], getattr(state_ref, part)[leaf]
            assert got.dtype == jnp.float32
            assert_close(got, want, tol, f"final {part}[{leaf}]")
    for name, got, want in zip(INPUT_NAMES[:6], grads[:6], grads_ref[:6]):
        assert_close(got, want, tol, f"d{name}")
    for part in ("weights", "momentum"):
        for leaf in ("W1", "W2"):
            got, want = getattr(grads[6], part)[leaf], getattr(grads_ref[6], part)[leaf]
            assert_close(got, want, tol, f"d initial {part}[{leaf}]")


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison; the chunked oracle's results are cached per case (`expected`), so the
    TPU and GPU kernels share one oracle run."""

    batch: int
    length: int
    heads: int
    dim: int
    chunk: int
    spec: MemorySpec = TITANS
    bfloat16: bool = False
    strong_decay: bool = False
    seed: int = 0

    def inputs(self):
        inputs = make_inputs(
            self.seed, self.batch, self.length, self.heads, self.dim, self.spec, self.strong_decay
        )
        if self.bfloat16:  # kernel: bf16 q, k, v; oracle: the same values in float32
            inputs = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
        return inputs


@functools.cache
def expected(case):
    inputs = case.inputs()
    inputs = tuple(x.astype(jnp.float32) for x in inputs[:3]) + inputs[3:]
    return value_and_vjp(chunked_fn(case.spec, case.chunk), inputs)


def check_kernel(case, platform, tol=F32_TOL):
    actual = value_and_vjp(kernel_fn(case.spec, case.chunk, platform), case.inputs())
    assert_all_close(actual, expected(case), tol)
    return actual


SHARED_CASES = {
    # 37 tokens: 3 chunks, the last partial; a batch of 2, two heads, D = 32.
    "B2-H2-T37-D32": Case(2, 37, 2, 32, 16, seed=1),
}


@pytest.mark.parametrize("case", list(SHARED_CASES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_matches_chunked(platform, case):
    check_kernel(SHARED_CASES[case], platform)


# One partial chunk only (11 of 16 tokens), bfloat16 q, k, v.
BF16_CASE = Case(1, 11, 1, 16, 16, bfloat16=True, seed=3)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_bfloat16_inputs(platform):
    (o, _), grads = check_kernel(BF16_CASE, platform, BF16_TOL)
    assert o.dtype == jnp.bfloat16
    assert all(grad.dtype == jnp.bfloat16 for grad in grads[:3])


# The per-chunk math is shared by both kernels (kernel_math.py), so the math-level cases
# below run on one platform each.


def test_tpu_kernel_chunk_of_8_and_silu():
    """Chunk 8 (TPU only: Triton's dots need sides >= 16), SiLU memory, 3 chunks."""
    check_kernel(Case(1, 20, 1, 16, 8, spec=MemorySpec(activation="silu"), seed=4), "tpu")


def test_gpu_kernel_strong_decay_and_zero_momentum():
    """g = -8 and eta = 0 on a fifth of the tokens each: the coefficient products must stay
    exact (no division by eta, no cancellation in the decays)."""
    check_kernel(Case(1, 29, 1, 16, 16, strong_decay=True, seed=5), "gpu")


def _vmap_examples():
    return [make_inputs(seed, 1, 32, 1, 16) for seed in (6, 7)]


def _loss(run, inputs):
    o, state = run(*inputs)
    return jnp.sum(jnp.sin(o)) + sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(state))


@functools.cache
def _vmap_expected():
    """jax.grad of the chunked form, example by example (two whole chunks each)."""
    grad = jax.jit(jax.grad(lambda x: _loss(chunked_fn(TITANS, 16), x)))
    return [grad(example) for example in _vmap_examples()]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_under_vmap_jit_and_grad(platform):
    """An extra leading axis mapped with vmap (pallas_call's batching rule) over the
    gradient, inside jit, against the chunked form run example by example."""
    examples = _vmap_examples()
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *examples)
    kernel_grad = jax.grad(lambda x: _loss(kernel_fn(TITANS, 16, platform), x))
    grads = jax.jit(jax.vmap(kernel_grad))(stacked)
    for index, expected_grads in enumerate(_vmap_expected()):
        leaves = zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected_grads))
        for (path, got), want in leaves:
            name = jax.tree_util.keystr(path)
            assert_close(got[index], want, F32_TOL, f"example {index} d{name}")


# ----------------------------------------------------------------------- lowering checks


def _export_args(dim, dtype, batch=2, length=100, heads=2, spec=TITANS):
    token = jax.ShapeDtypeStruct((batch, length, heads, dim), dtype)
    per_token = jax.ShapeDtypeStruct((batch, length, heads), jnp.float32)
    leaves = {n: jax.ShapeDtypeStruct((batch, heads, *s), jnp.float32)
              for n, s in spec.weight_shapes(dim, dim).items()}  # fmt: skip
    return (token, token, token, per_token, per_token, per_token, NeuralMemoryState(leaves, leaves))


# The Triton custom call has no export-stability guarantee; this target name is what jax
# 0.10 emits for Pallas Triton kernels.
_TRITON_TARGET = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("dim,dtype", [(128, jnp.float32), (64, jnp.bfloat16), (16, jnp.float32)])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernels_lower_for_their_platform(platform, dim, dtype):
    """Forward and backward (value and grad of all inputs) export for TPU / CUDA from this
    CPU machine, with a partial final chunk (T = 100, chunk 16)."""

    def loss(*inputs):
        o, state = kernel_fn(TITANS, 16, platform, interpret=False)(*inputs)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(x) for x in jax.tree.leaves(state))

    export_platform = "tpu" if platform == "tpu" else "cuda"
    checks = (
        [] if platform == "tpu" else [jax.export.DisabledSafetyCheck.custom_call(_TRITON_TARGET)]
    )
    with lowering_target(platform):
        exported = jax.export.export(
            jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)))),
            platforms=[export_platform],
            disabled_checks=checks,
        )(*_export_args(dim, dtype))
    marker = "tpu_custom_call" if platform == "tpu" else _TRITON_TARGET
    assert exported.mlir_module().count(marker) == 2, "one forward and one backward kernel"


def test_backward_chunk_math_has_no_transposes_and_full_precision_dots():
    """What the export cannot see: the backward's matmuls come without 2-D transposes
    (`kernel_math._dot_for_vjp`), and every dot asks for HIGHEST precision (Pallas Triton
    lowers None / DEFAULT / HIGH float32 dots as TF32, far outside F32_TOL) at the precision
    both kernels pass (`kernel_common.static_options`)."""
    config = types.SimpleNamespace(activation="gelu", norm_eps=1e-6)
    precision = kernel_common.static_options(config)["precision"]
    size, dim = 16, 16
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    state = (zeros(dim, 2 * dim),) * 4
    jaxpr = jax.make_jaxpr(
        lambda *args: kernel_math.chunk_step_backward(
            *args, activation="gelu", norm_eps=1e-6, precision=precision
        )
    )(zeros(size, dim), zeros(size, dim), zeros(size, dim), (zeros(size, 1), zeros(1, size)) * 3,
      state, jnp.int32(size - 1), zeros(size, dim), state)  # fmt: skip
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "transpose" not in primitives
    dots = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert len(dots) > 50
    highest = (jax.lax.Precision.HIGHEST,) * 2
    assert all(eqn.params["precision"] == highest for eqn in dots)


def test_tpu_kernel_lowers_under_vmap():
    """Mosaic lowering of the vmapped kernel (vmap adds a grid axis)."""

    run = kernel_fn(TITANS, 16, "tpu", interpret=False)

    stacked = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((3, *x.shape), x.dtype), _export_args(128, jnp.float32)
    )
    text = jax.export.export(jax.jit(jax.vmap(run)), platforms=["tpu"])(*stacked).mlir_module()
    assert text.count("tpu_custom_call") == 1


# ----------------------------------------------------------------------- dispatcher rules

# (spec, platform, D, chunk, dtype) -> the reason's key word, or None (the kernel takes it).
REJECT_CASES = [
    (TITANS, "tpu", 128, 16, jnp.float32, None),
    (TITANS, "tpu", 16, 8, jnp.float32, None),
    (TITANS, "tpu", 16, 8, jnp.bfloat16, "chunk_size"),  # bf16 sublane tile is 16
    (TITANS, "tpu", 48, 24, jnp.float32, None),  # any D; chunk a multiple of 8
    (TITANS, "tpu", 16, 12, jnp.float32, "chunk_size"),
    (TITANS, "gpu", 32, 16, jnp.bfloat16, None),
    (TITANS, "gpu", 16, 8, jnp.float32, "chunk_size"),  # Triton dots: sides >= 16
    (TITANS, "gpu", 48, 16, jnp.float32, "D="),  # not a power of 2
    (MemorySpec(expansion=3), "gpu", 16, 16, jnp.float32, "E·D"),
    (MemorySpec(expansion=3), "tpu", 16, 16, jnp.float32, None),
    (TITANS, "tpu", 16, 16, jnp.float16, "dtype"),
    (MemorySpec(rule="gd"), "tpu", 16, 16, jnp.float32, "rule"),
    (MemorySpec(bias="dot_product"), "gpu", 16, 16, jnp.float32, "bias"),
    (MemorySpec(depth=3), "tpu", 16, 16, jnp.float32, "depth"),
    (MemorySpec(architecture="matrix"), "tpu", 16, 16, jnp.float32, "architecture"),
]


@pytest.mark.parametrize("spec,platform,dim,chunk,dtype,reason", REJECT_CASES)
def test_kernel_rejects(spec, platform, dim, chunk, dtype, reason):
    got = kernel_api.kernel_rejects(spec, platform, dim, dim, chunk, (dtype, dtype, dtype))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_kernel_rejects_other_miras_choices_and_unequal_dims():
    """Choices the kernels do not implement (the spec fields helper A adds) go to chunked."""
    others = [("bias", "lp"), ("bias", "huber"), ("retention", "lq"), ("retention", "kl")]
    others += [("rule", "muon"), ("omega_window", 2)]
    for field, value in others:
        try:
            spec = MemorySpec(**{field: value})
        except (TypeError, ValueError):  # a choice this checkout's MemorySpec lacks
            continue
        reason = kernel_api.kernel_rejects(spec, "tpu", 16, 16, 16, (jnp.float32,))
        assert reason is not None and field in reason, (field, value, reason)
    assert "Dk=16" in kernel_api.kernel_rejects(TITANS, "tpu", 16, 32, 16, (jnp.float32,))


# (backend, D, chunk, dtype, spec) -> platform impl="auto" picks (None: chunked).
AUTO_CASES = [
    ("cpu", 128, 16, jnp.float32, TITANS, None),
    ("tpu", 128, 16, jnp.float32, TITANS, "tpu"),
    ("tpu", 64, 32, jnp.bfloat16, TITANS, "tpu"),
    ("tpu", 256, 16, jnp.float32, TITANS, None),  # state beyond the VMEM budget
    ("tpu", 32, 16, jnp.float32, TITANS, None),  # not lane-dense
    ("tpu", 128, 8, jnp.float32, TITANS, None),  # chunk not a multiple of 16
    ("tpu", 128, 16, jnp.float32, MemorySpec(rule="gd"), None),
    ("gpu", 32, 16, jnp.float32, TITANS, "gpu"),
    ("cuda", 16, 64, jnp.bfloat16, TITANS, "gpu"),
    ("gpu", 64, 16, jnp.float32, TITANS, None),  # state spills out of registers
    ("gpu", 32, 128, jnp.float32, TITANS, None),  # chunk above 64
    ("gpu", 32, 16, jnp.float16, TITANS, None),
    ("gpu", 32, 16, jnp.float32, MemorySpec(bias="dot_product"), None),
]


@pytest.mark.parametrize("backend,dim,chunk,dtype,spec,expected", AUTO_CASES)
def test_kernel_platform_for_auto(monkeypatch, backend, dim, chunk, dtype, spec, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    token = jnp.zeros((1, 4, 1, dim), dtype)
    assert kernel_api.kernel_platform_for_auto(spec, token, token, token, chunk) == expected


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_matches_chunked_larger_shapes(platform):
    """D = 64, chunk 32, two heads, a batch of 2, 4 chunks with a partial last one."""
    check_kernel(Case(2, 100, 2, 64, 32, seed=8), platform)
