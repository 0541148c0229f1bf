"""SlimAdam against a float64 NumPy transcription of the reference `SlimAdamW.step`
(ml-conf-authors/low-memory-adam), with the paper's Table 1 rules in PyTorch layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optim
from optim import slimadam
from tests.optim.trees import lm_params_and_axes

LR, B1, B2, EPS = 1e-2, 0.9, 0.95, 1e-8
RTOL, ATOL = 2e-5, 2e-6  # float32 vs float64 over 4 steps: rounding only
# Paper rules on PyTorch [fan_out, fan_in] weights (dim 1 = fan_in, dim 0 = fan_out);
# nn.Embedding [vocab, embed] and the head [vocab, embed] both compress dim 1, the embed axis.
QUERY, OUT, DOWN = "attention/query/kernel", "attention/out/kernel", "mlp/down/kernel"
EMBEDDING, HEAD, NORM = "embedding/embedding", "lm_head/kernel", "attention_norm/scale"
PT_RULES = {QUERY: (1,), OUT: (0,), DOWN: (0,), EMBEDDING: (1,), HEAD: (1,), NORM: None}
SHAPES = {QUERY: (6, 10), OUT: (10, 6), DOWN: (14, 6), EMBEDDING: (20, 6), HEAD: (6, 20)}
SHAPES |= {NORM: (6,)}
AXES = {QUERY: P("embed", "qkv"), OUT: P("qkv", "embed"), DOWN: P("mlp", "embed")}
AXES |= {EMBEDDING: P("vocab", "embed"), HEAD: P("embed", "vocab"), NORM: P("norm")}


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def slimadam_step_pt(W, G, state, dims, wd):
    state["step"] += 1
    state["mu"] = B1 * state["mu"] + (1 - B1) * G
    squared = G * G if dims is None else np.mean(G * G, axis=dims, keepdims=True)
    state["nu"] = B2 * state["nu"] + (1 - B2) * squared
    W = W * (1 - LR * wd)
    mu_hat = state["mu"] / (1 - B1 ** state["step"])
    nu_hat = state["nu"] / (1 - B2 ** state["step"])
    return W - LR * mu_hat / (np.sqrt(nu_hat) + EPS)


def _to_pt(path, array):
    """Flax -> PyTorch layout: kernels transpose; embedding tables and norms do not."""
    return array.T if path.endswith("kernel") else array


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_reference_with_paper_rules(weight_decay):
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    params, logical_axes = _nest({k: jnp.asarray(v) for k, v in flat.items()}), _nest(AXES)
    axes = slimadam.axes_from_rules(params, logical_axes)
    decay = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731 (reference)
    tx = slimadam.slimadam(
        LR, reduce_axes=axes, b1=B1, b2=B2, eps=EPS, weight_decay=weight_decay,
        weight_decay_mask=decay,
    )  # fmt: skip
    state = tx.init(params)
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in "abcd"]
    for g in grads:
        updates, state = jax.jit(tx.update)(_nest(g), state, params)
        params = optax.apply_updates(params, updates)

    for path, W in flat.items():
        W_pt = _to_pt(path, W.astype(np.float64))
        dims = PT_RULES[path]
        nu_shape = W_pt.shape if dims is None else np.mean(W_pt, axis=dims, keepdims=True).shape
        ref = {"step": 0, "mu": np.zeros_like(W_pt), "nu": np.zeros(nu_shape)}
        for g in grads:
            W_pt = slimadam_step_pt(
                W_pt, _to_pt(path, g[path]), ref, dims, weight_decay * (W.ndim >= 2)
            )
        got = params
        for part in path.split("/"):
            got = got[part]
        np.testing.assert_allclose(got, _to_pt(path, W_pt), rtol=RTOL, atol=ATOL, err_msg=path)
        nu = state[0].nu
        for part in path.split("/"):
            nu = nu[part]
        assert nu.shape == _to_pt(path, np.zeros(nu_shape)).shape, path


def test_no_compression_equals_optax_adamw():
    params, axes = lm_params_and_axes()
    config = optim.default_config()
    config.name, config.slimadam.rules = "slimadam", "none"
    config.warmup_steps, config.grad_clip_norm = 0, 0.0
    tx = optim.build(config, params, axes, num_steps=10)
    reference = optax.adamw(
        optim.learning_rate_schedule(config, 10),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=optim.weight_decay_mask(params, axes),
    )
    state, ref_state, got, want = tx.init(params), reference.init(params), params, params
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 3.0)), params)
        updates, state = jax.jit(tx.update)(grads, state, got)
        got = optax.apply_updates(got, updates)
        ref_updates, ref_state = reference.update(grads, ref_state, want)
        want = optax.apply_updates(want, ref_updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_calibration_picks_the_constant_axis():
    rng = np.random.default_rng(0)
    spread = np.exp(np.linspace(-3, 3, 12))  # per-column scale: v varies along fan_out only
    batches = []
    for _ in range(8):
        batches.append(
            {
                "q": {"kernel": rng.normal(size=(16, 12)) * spread[None, :]},
                "o": {"kernel": rng.normal(size=(12, 16)) * spread[:, None]},
                "norm": {"scale": rng.normal(size=(12, 12))},
                "gate": rng.normal(size=(12,)),
            }
        )
    choice = slimadam.calibrate_axes(batches, snr_cutoff=1.0)
    assert choice["q/kernel"] == (-2,)  # constant along fan_in: average over fan_in
    assert choice["o/kernel"] == (-1,)  # constant along fan_out
    assert choice["norm/scale"] is None and choice["gate"] is None  # never compressed
    tx = slimadam.slimadam(LR, reduce_axes=choice)
    state = tx.init(jax.tree.map(jnp.asarray, batches[0]))
    assert state[0].nu["q"]["kernel"].shape == (1, 12)
    assert state[0].nu["o"]["kernel"].shape == (12, 1)
