"""`api.neural_memory`'s impl dispatch to the deep-memory kernels of `kernel_api`: a forced
kernel (interpret mode) gives the chunked result through the public API, refused calls say
why, and impl="auto" runs a kernel only where `kernel_api` covers the backend and spec."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import MemoryInputs, api, kernel_api
from tests.pallas_kernels.test_neural_memory_kernels import F32_TOL, TITANS, make_inputs


def call(inputs, spec=TITANS, extra=None, **kwargs):
    record = MemoryInputs(*inputs[:6], extra=extra or {})
    return api.neural_memory(
        record, memory=spec, initial_state=inputs[6], chunk_size=16, output_final_state=True,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "pallas"])
def test_forced_kernel_in_interpret_mode_equals_chunked(impl):
    inputs = make_inputs(0, batch=1, length=19, heads=1, dim=16)
    expected = call(inputs, impl="chunked")
    actual = call(inputs, impl=impl, interpret=True)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(got, want, rtol=0, atol=F32_TOL * scale)


def test_forced_kernel_refuses_other_choices_and_inputs():
    inputs = make_inputs(0, batch=1, length=8, heads=1, dim=16)
    with pytest.raises(ValueError, match="pallas_gpu.*gpu kernel does not take MemorySpec.rule"):
        gd = dataclasses.replace(TITANS, rule="gd")
        q, k, v, lr, _, g, state = inputs
        api.neural_memory(
            MemoryInputs(q, k, v, lr, None, g), memory=gd, impl="pallas_gpu", interpret=True,
            initial_state=api.init_state(gd, {n: w[0] for n, w in state.weights.items()}, 1),
        )  # fmt: skip
    omega = dataclasses.replace(TITANS, omega_window=2)
    state = api.init_state(omega, {n: w[0] for n, w in inputs[6].weights.items()}, 1)
    with pytest.raises(ValueError, match="tpu kernel does not take MemorySpec.omega_window"):
        call(inputs[:6] + (state,), spec=omega, impl="pallas_tpu", interpret=True,
             extra={"omega_gate": jnp.ones_like(inputs[3])})  # fmt: skip
    with pytest.raises(ValueError, match="impl='pallas' on backend 'cpu'"):
        call(inputs, impl="pallas")


@pytest.mark.parametrize(
    "backend, extra, runs_kernel",
    [("cpu", {}, False), ("gpu", {}, True), ("tpu", {}, False), ("gpu", {"omega": 1}, False)],
)
def test_auto_runs_a_kernel_only_where_covered(monkeypatch, backend, extra, runs_kernel):
    """D=16, chunk 16: the GPU kernel's auto range (D <= 32); TPU's auto wants D in {64, 128}.
    An omega_gate input always goes to chunked (the kernels do not implement it)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    calls = []
    monkeypatch.setattr(kernel_api, "run_kernel", lambda *a, **kw: calls.append(kw) or (0, 0))
    inputs = make_inputs(0, batch=1, length=8, heads=1, dim=16)
    if extra:
        omega = dataclasses.replace(TITANS, omega_window=2)
        state = api.init_state(omega, {n: w[0] for n, w in inputs[6].weights.items()}, 1)
        call(inputs[:6] + (state,), spec=omega, impl="auto",
             extra={"omega_gate": jnp.ones_like(inputs[3])})  # fmt: skip
    else:
        call(inputs, impl="auto")
    assert [c["platform"] for c in calls] == (["gpu"] if runs_kernel else [])
