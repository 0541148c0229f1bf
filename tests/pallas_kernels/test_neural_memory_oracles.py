"""Written-out NumPy oracles for four deep-memory choices: Moneta's lq retention, Memora's
KL retention, Yaad's Huber biases and the Titans momentum rule; and for the papers' own
parallel forms of Moneta and Memora (Miras §5.4: lq normalised at chunk boundaries, kl's
lag-token chunk).

The other tests hold `chunked` to `reference`, and both call the same choice functions, so
a wrong formula in a choice would pass them. Here each update is written again from the
paper's equation in float64 NumPy, per head, for 3 tokens and tiny dims, without calling
the package's choice functions; the inner-loss gradient is written out by hand (the
package's reference takes it with `jax.grad`). The package runs in float64 under jax x64,
so any formula difference shows far above the 1e-10 tolerance.

Each oracle takes `chunk_size`: the chunk-parallel form (Titans §3.2, eqs. 16-18) takes
every gradient of a chunk at one point fixed by the chunk start -- W_{c0} for lq / kl,
gamma_t M_{c0} for gated decay (`reference` module doc) -- and is otherwise the exact rule,
which chunk_size 1 is. So `chunked` is checked against the same written-out oracle.

Where the code documents a departure from a paper, the oracle follows the documented form
(named in each docstring): the 1/2 of the l2 loss (absorbed into theta), the gradient of
the gated-decay rule taken at the retained memory, and Memora's scale c.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.neural_memory import MemorySpec, NeuralMemoryState, chunked, reference
from pallas_kernels.neural_memory.choices_miras import KL_PROBABILITY_FLOOR
from pallas_kernels.neural_memory.memory_inputs import from_named
from tests.pallas_kernels.test_neural_memory import F64_TOL, max_relative_error

BATCH, HEADS, SEQ_LEN = 1, 2, 3
KEY_DIM, VALUE_DIM = 3, 4  # unequal, so a transposed matrix memory cannot pass
MLP_DIM = 4  # the MLP memory needs Dk == Dv
IMPLS = ("reference", "chunked-1", "chunked-2")


# ------------------------------------------------------------------------------- inputs


def make_inputs(seed, key_dim, value_dim):
    """Per-token inputs [B, T, H, ...] as float64 NumPy: unit q/k, theta in 0.2..0.6 (large
    steps, so every term of an update matters), g in -0.5..-0.05, eta in 0.3..0.9."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    shape = (BATCH, SEQ_LEN, HEADS)
    return {
        "q": unit(rng.standard_normal((*shape, key_dim))),
        "k": unit(rng.standard_normal((*shape, key_dim))),
        "v": rng.standard_normal((*shape, value_dim)),
        "lr": rng.uniform(0.2, 0.6, shape),
        "momentum": rng.uniform(0.3, 0.9, shape),
        "log_decay": -rng.uniform(0.05, 0.5, shape),
    }


def run_package(spec, inputs, weights, momentum, impl):
    """The package on float64 inputs: (o [B, T, H, Dv], final weights, final momentum)."""
    with jax.enable_x64(True):
        record = from_named({n: jnp.asarray(x) for n, x in inputs.items() if x is not None})
        as_jax = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
        state = NeuralMemoryState(as_jax(weights), as_jax(momentum))
        if impl == "reference":
            output, final = reference.exact_scan(spec, record, state)
        elif impl.startswith("chunk-start-reference"):  # the chunked form's own oracle
            output, final = reference.chunk_start_scan(spec, record, state, chunk_size_of(impl))
        else:
            output, final = chunked.chunked_scan(spec, record, state, chunk_size_of(impl))
        assert output.dtype == jnp.float64
        return jax.tree.map(np.asarray, (output, final.weights, final.momentum))


def chunk_size_of(impl):
    """impl "chunked-2" -> 2; the reference is the exact rule, chunk size 1 (T = 3 with chunk 2
    is one whole chunk and a partial one)."""
    return 1 if impl == "reference" else int(impl.split("-")[-1])


def per_head(oracle, inputs, states, **options):
    """Run a one-head oracle (inputs [T, ...], states {name: [d_in, d_out]}) on every
    (batch, head) -> (o [B, T, H, Dv], {name: [B, H, ...]} per returned state dict)."""
    outputs = np.zeros(inputs["v"].shape)
    finals = []
    for b in range(BATCH):
        for h in range(HEADS):
            head_inputs = {n: None if x is None else x[b, :, h] for n, x in inputs.items()}
            head_states = [{n: x[b, h] for n, x in s.items()} for s in states]
            outputs[b, :, h], *head_finals = oracle(head_inputs, *head_states, **options)
            finals.append(head_finals)
    stacked = [
        {n: np.stack([f[i][n] for f in finals]).reshape(BATCH, HEADS, *finals[0][i][n].shape)
         for n in finals[0][i]}
        for i in range(len(finals[0]))
    ]  # fmt: skip
    return outputs, *stacked


def starts_chunk(t, chunk_size):
    return t % chunk_size == 0


# ------------------------------------------------------------ Moneta: lq retention


def lq_normalise(accumulator, q):
    """W = A / ||A||_q^(q-2), ||A||_q = (sum_ij |A_ij|^q)^(1/q) over the whole matrix."""
    norm = np.sum(np.abs(accumulator) ** q) ** (1.0 / q)
    return accumulator / norm ** (q - 2.0)


def moneta_numpy(x, weights, *, q, p, lp_eps, chunk_size, normaliser="token"):
    """Moneta (Miras eq. 24) with a matrix memory M(k) = k W, one head:
        A_t = alpha_t A_{t-1} - theta_t grad l_p(W_{t-1}; k_t, v_t),  W_t = A_t / ||A_t||_q^(q-2),
        o_t = q_t W_t, alpha_t = exp(g_t).
    l_p (Miras eqs. 10-11, with the package's documented 1/p and smoothing, `choices_miras`):
    grad_W (1/p) sum_j (e_j^2 + eps)^(p/2) = k_t^T [e (e^2 + eps)^((p-2)/2)], e = k_t W - v_t;
    p = 2 is the plain 1/2 ||e||^2 (its gradient k^T e, no eps at all).
    normaliser "chunk_start" (Miras §5.4: normalised at chunk boundaries only): token t
    reads o_t = q_t A_t / ||A_{c0}||_q^(q-2), the norm of the chunk-start accumulator."""
    accumulator = weights["W"].copy()
    outputs = []
    for t in range(len(x["k"])):
        if starts_chunk(t, chunk_size):
            point = lq_normalise(accumulator, q)  # W_{c0}; W_{t-1} when chunk_size == 1
            start_norm = np.sum(np.abs(accumulator) ** q) ** (1.0 / q)
        error = x["k"][t] @ point - x["v"][t]
        if p != 2.0:
            error = error * (error**2 + lp_eps) ** ((p - 2.0) / 2.0)
        gradient = np.outer(x["k"][t], error)
        accumulator = np.exp(x["log_decay"][t]) * accumulator - x["lr"][t] * gradient
        if normaliser == "token":
            outputs.append(x["q"][t] @ lq_normalise(accumulator, q))
        else:
            outputs.append(x["q"][t] @ (accumulator / start_norm ** (q - 2.0)))
    return np.stack(outputs), {"W": accumulator}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [2.0, 3.0], ids=["l2", "lp3"])
def test_lq_retention_matches_written_out_moneta(p, impl):
    """Miras eq. 24 with q = 4 (Moneta's default), with the l2 bias and with Moneta's l3.
    lq_eps = 0 makes the package's norm exactly the paper's ||A||_q."""
    spec = MemorySpec(architecture="matrix", bias="lp" if p != 2.0 else "l2", lp_p=p,
                      retention="lq", lq_q=4.0, lq_eps=0.0, rule="gd")  # fmt: skip
    inputs = make_inputs(0, KEY_DIM, VALUE_DIM)
    inputs["momentum"] = None
    rng = np.random.default_rng(1)
    # A ~ N(0, 1): ||A||_4^2 ~ 6 (12 entries), so W is far from A and the map matters.
    weights = {"W": rng.standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM))}
    expected_output, expected_weights = per_head(
        moneta_numpy, inputs, [weights], q=4.0, p=p, lp_eps=spec.lp_eps,
        chunk_size=chunk_size_of(impl),
    )  # fmt: skip
    output, final_weights, _ = run_package(spec, inputs, weights, None, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_weights, expected_weights) < F64_TOL
    # Guards: the map is far from the identity, and chunking changes the rule.
    head = expected_weights["W"][0, 0]
    assert np.max(np.abs(lq_normalise(head, 4.0) - head)) > 0.1
    if impl == "chunked-2":
        exact, _ = per_head(moneta_numpy, inputs, [weights], q=4.0, p=p, lp_eps=spec.lp_eps,
                            chunk_size=1)  # fmt: skip
        assert max_relative_error(exact, expected_output) > 1e-4


@pytest.mark.parametrize("impl", ["chunk-start-reference-2", "chunked-1", "chunked-2"])
def test_lq_chunk_start_normaliser_matches_written_out_moneta(impl):
    """`lq_normaliser="chunk_start"` (Miras §5.4's parallel form): the accumulator as eq. 24,
    each token read with its chunk-start norm; the chunked form (linear, no per-token
    weights) and `reference.chunk_start_scan` against the oracle, Moneta's l3 bias."""
    spec = MemorySpec(architecture="matrix", bias="lp", lp_p=3.0, retention="lq", lq_q=4.0,
                      lq_eps=0.0, lq_normaliser="chunk_start", rule="gd")  # fmt: skip
    assert spec.linear_in_chunk
    inputs = make_inputs(0, KEY_DIM, VALUE_DIM)
    inputs["momentum"] = None
    weights = {"W": np.random.default_rng(1).standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM))}
    chunk_size = chunk_size_of(impl)
    expected_output, expected_weights = per_head(
        moneta_numpy, inputs, [weights], q=4.0, p=3.0, lp_eps=spec.lp_eps,
        chunk_size=chunk_size, normaliser="chunk_start",
    )  # fmt: skip
    output, final_weights, _ = run_package(spec, inputs, weights, None, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_weights, expected_weights) < F64_TOL
    # Guard: reading at the chunk-start norm differs from eq. 24's per-token norm.
    per_token, _ = per_head(moneta_numpy, inputs, [weights], q=4.0, p=3.0,
                            lp_eps=spec.lp_eps, chunk_size=chunk_size)  # fmt: skip
    assert max_relative_error(per_token, expected_output) > 1e-3


# ------------------------------------------------------------ Memora: KL retention


def column_softmax(logits):
    """softmax over d_in (axis 0) of a [d_in, d_out] matrix: each column a distribution."""
    shifted = np.exp(logits - np.max(logits, axis=0, keepdims=True))
    return shifted / np.sum(shifted, axis=0, keepdims=True)


def memora_numpy(x, weights, *, scale, chunk_size):
    """Memora (Miras eq. 27) with a matrix memory M(k) = k W, one head, in weight space:
        W_t = c Softmax(alpha_t log W_{t-1} - theta_t grad l_2(W_{t-1}; k_t, v_t)),
        grad l_2 = k_t^T (k_t W_{t-1} - v_t),  o_t = q_t W_t,  alpha_t = exp(g_t),
    softmax over d_in per column. Documented departure (`choices_miras`): c = kl_scale
    sqrt(d_in) instead of 1. c only shifts each column of log W by alpha_t log c, which
    the softmax ignores, so the paper's form holds with the factor c outside. The initial
    state is c Softmax(P_0) of the stored logits; the returned state is log(W_T / c), the
    normalised log-probabilities the package stores."""
    matrix = scale * column_softmax(weights["W"])
    outputs = []
    for t in range(len(x["k"])):
        if starts_chunk(t, chunk_size):
            point = matrix  # W_{c0}; W_{t-1} when chunk_size == 1
        gradient = np.outer(x["k"][t], x["k"][t] @ point - x["v"][t])
        alpha = np.exp(x["log_decay"][t])
        matrix = scale * column_softmax(alpha * np.log(matrix) - x["lr"][t] * gradient)
        outputs.append(x["q"][t] @ matrix)
    return np.stack(outputs), {"W": np.log(matrix / scale)}


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_retention_matches_written_out_memora(impl):
    """Miras eq. 27 (Memora) with kl_scale 1.5, so a wrong c (or one on the wrong axis)
    shows: the columns of W sum to 1.5 sqrt(3) and its rows do not."""
    spec = MemorySpec(architecture="matrix", bias="l2", retention="kl", kl_scale=1.5, rule="gd")
    inputs = make_inputs(2, KEY_DIM, VALUE_DIM)
    inputs["momentum"] = None
    rng = np.random.default_rng(3)
    logits = {"W": rng.standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM))}
    scale = 1.5 * math.sqrt(KEY_DIM)
    expected_output, expected_logits = per_head(
        memora_numpy, inputs, [logits], scale=scale, chunk_size=chunk_size_of(impl)
    )
    output, final_logits, _ = run_package(spec, inputs, logits, None, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_logits, expected_logits) < F64_TOL
    # Guards: the update moves the distribution (vs retention alone), chunking changes it.
    retained = np.log(column_softmax(np.exp(np.sum(inputs["log_decay"], 1))[..., None, None]
                                     * logits["W"]))  # fmt: skip
    assert np.max(np.abs(retained - expected_logits["W"])) > 1e-2
    if impl == "chunked-2":
        exact, _ = per_head(memora_numpy, inputs, [logits], scale=scale, chunk_size=1)
        assert max_relative_error(exact, expected_output) > 1e-4


def memora_lag_token_numpy(x, weights, *, scale, chunk_size, floor):
    """Memora in Miras §5.4's parallel form (`kl_chunk_form="lag_token"`), matrix memory,
    one head: a chunk's first ("lag") token is eq. 27 from the chunk-start W (as
    `memora_numpy`), giving W_1; each later token of the chunk steps the weights themselves,
        W_t = alpha_t W_{t-1} - theta_t k_t^T (k_t W_1 - v_t)     (gradient at W_1),
    o_t = q_t W_t; after a chunk's last token (unless it is the lag token) W returns to the
    simplex column by column: W <- c Softmax(log max(W / c, floor))."""
    matrix = scale * column_softmax(weights["W"])
    seq_len = len(x["k"])
    outputs = []
    for t in range(seq_len):
        k, v, alpha, lr = x["k"][t], x["v"][t], np.exp(x["log_decay"][t]), x["lr"][t]
        if starts_chunk(t, chunk_size):
            gradient = np.outer(k, k @ matrix - v)
            matrix = scale * column_softmax(alpha * np.log(matrix) - lr * gradient)
            lag = matrix
        else:
            matrix = alpha * matrix - lr * np.outer(k, k @ lag - v)
        outputs.append(x["q"][t] @ matrix)
        chunk_end = t % chunk_size == chunk_size - 1 or t == seq_len - 1
        if chunk_end and not starts_chunk(t, chunk_size):
            matrix = scale * column_softmax(np.log(np.maximum(matrix / scale, floor)))
    return np.stack(outputs), {"W": np.log(matrix / scale)}


@pytest.mark.parametrize("impl", ["chunk-start-reference-2", "chunked-1", "chunked-2", "chunked-3"])
def test_kl_lag_token_chunk_matches_written_out_memora(impl):
    """`kl_chunk_form="lag_token"` (Miras §5.4's parallel Memora) with kl_scale 1.5: the chunked
    form (linear after the lag token) and `reference.chunk_start_scan` against the oracle;
    chunk 1 is eq. 27 itself."""
    spec = MemorySpec(architecture="matrix", bias="l2", retention="kl", kl_scale=1.5,
                      kl_chunk_form="lag_token", rule="gd")  # fmt: skip
    assert spec.linear_in_chunk
    inputs = make_inputs(2, KEY_DIM, VALUE_DIM)
    inputs["momentum"] = None
    logits = {"W": np.random.default_rng(3).standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM))}
    scale = 1.5 * math.sqrt(KEY_DIM)
    chunk_size = chunk_size_of(impl)
    expected_output, expected_logits = per_head(
        memora_lag_token_numpy, inputs, [logits], scale=scale, chunk_size=chunk_size,
        floor=KL_PROBABILITY_FLOOR,
    )  # fmt: skip
    output, final_logits, _ = run_package(spec, inputs, logits, None, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_logits, expected_logits) < F64_TOL
    exact, _ = per_head(memora_numpy, inputs, [logits], scale=scale, chunk_size=1)
    if chunk_size == 1:  # every token a lag token: eq. 27
        assert max_relative_error(exact, expected_output) < F64_TOL
    else:  # guard: the additive steps are not eq. 27
        assert max_relative_error(exact, expected_output) > 1e-3


# ------------------------------------------------------------ Yaad: Huber biases


def yaad_numpy(x, weights, *, branch, chunk_size):
    """Yaad (Miras eq. 26) with a matrix memory M(k) = k W and gated decay, one head:
        W_t = alpha_t W_{t-1} - theta_t k_t^T u_t,  e = k_t W~ - v_t,  o_t = q_t W_t,
        u_t = e                     if ||e||_2 <= delta_t,
              delta_t Sign(e)       otherwise ("huber": eq. 26's delta_t grad ||e||_1),
              delta_t e / ||e||_2   otherwise ("huber_norm": grad of delta_t ||e||_2).
    The gradient is taken at the retained memory W~ = gamma_t W_{c0} (gated decay's
    documented departure, as in `titans_numpy`). Returns the branch each token took too."""
    memory = weights["W"].copy()
    outputs, outside = [], []
    for t in range(len(x["k"])):
        keep = np.exp(x["log_decay"][t])
        if starts_chunk(t, chunk_size):
            chunk_start, gamma = memory, 1.0
        gamma = gamma * keep
        error = x["k"][t] @ (gamma * chunk_start) - x["v"][t]
        norm, delta = np.sqrt(np.sum(error**2)), x["huber_delta"][t]
        outside.append(norm > delta)
        if norm <= delta:
            update = error
        elif branch == "huber":
            update = delta * np.sign(error)
        else:
            update = delta * error / norm
        memory = keep * memory - x["lr"][t] * np.outer(x["k"][t], update)
        outputs.append(x["q"][t] @ memory)
    return np.stack(outputs), {"W": memory}, {"outside": np.array(outside)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("branch", ["huber", "huber_norm"])
def test_huber_biases_match_written_out_yaad(branch, impl):
    """Both Huber biases, with thresholds that send some tokens to each branch: 0.3 (every
    error here is larger) or 10 (every one smaller), per token and head."""
    spec = MemorySpec(architecture="matrix", bias=branch, retention="gated_decay", rule="gd")
    inputs = make_inputs(6, KEY_DIM, VALUE_DIM)
    inputs["momentum"] = None
    inputs["huber_delta"] = np.array([[0.3, 10.0], [10.0, 0.3], [0.3, 0.3]])[None]
    rng = np.random.default_rng(7)
    weights = {"W": rng.standard_normal((BATCH, HEADS, KEY_DIM, VALUE_DIM))}
    expected_output, expected_weights, taken = per_head(
        yaad_numpy, inputs, [weights], branch=branch, chunk_size=chunk_size_of(impl)
    )
    output, final_weights, _ = run_package(spec, inputs, weights, None, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_weights, expected_weights) < F64_TOL
    # Guard: both branches are taken, and the two linear branches differ.
    assert set(taken["outside"].ravel()) == {True, False}
    other = "huber" if branch == "huber_norm" else "huber_norm"
    other_output, _, _ = per_head(
        yaad_numpy, inputs, [weights], branch=other, chunk_size=chunk_size_of(impl)
    )
    assert max_relative_error(other_output, expected_output) > 1e-2


# ------------------------------------------------------------ Titans: momentum rule


def matrix_memory_gradient(weights, key, value):
    """Matrix memory M(k) = k W, loss 1/2 ||k W - v||^2: grad_W = k^T (k W - v); o = k W."""
    return {"W": np.outer(key, key @ weights["W"] - value)}


def matrix_memory_read(weights, query):
    return query @ weights["W"]


def gelu(x):
    """Exact GELU x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_derivative(x):
    """Phi(x) + x phi(x)."""
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return cdf + x * np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)


def mlp_forward(weights, x, eps):
    """Titans' deep memory, depth 2: M(x) = x + LN(gelu(x W1) W2), LN parameter-free,
    LN(z) = (z - mean z) / sqrt(var z + eps)."""
    z1 = x @ weights["W1"]
    hidden = gelu(z1)
    z2 = hidden @ weights["W2"]
    sigma = math.sqrt(np.var(z2) + eps)
    normed = (z2 - np.mean(z2)) / sigma
    return x + normed, (z1, hidden, normed, sigma)


def mlp_memory_gradient(weights, key, value, eps):
    """grad of 1/2 ||M(k) - v||^2 by the chain rule. The LN Jacobian from its definition:
    d normed_i / d z_j = (delta_ij - 1/n - normed_i normed_j / n) / sigma (symmetric)."""
    output, (z1, hidden, normed, sigma) = mlp_forward(weights, key, eps)
    n = len(normed)
    jacobian = (np.eye(n) - 1.0 / n - np.outer(normed, normed) / n) / sigma
    d_z2 = jacobian.T @ (output - value)  # the residual k does not depend on the weights
    d_z1 = (weights["W2"] @ d_z2) * gelu_derivative(z1)
    return {"W1": np.outer(key, d_z1), "W2": np.outer(hidden, d_z2)}


def titans_numpy(x, weights, momentum, *, gradient, read, chunk_size):
    """Titans eqs. 12-14 (momentum, eqs. 9-10, with forgetting), one head:
        S_t = eta_t S_{t-1} - theta_t grad l(M~_t; k_t, v_t),  M_t = (1 - alpha_t) M_{t-1} + S_t,
        o_t = M_t(q_t) (eq. 15, read after the update),  1 - alpha_t = exp(g_t),
        l = 1/2 ||M(k) - v||^2 (eq. 12 has no 1/2; theta absorbs it).
    Documented departure (`reference` module doc): the gradient is taken at the retained
    memory M~_t = (1 - alpha_t) M_{t-1} instead of M_{t-1}, as the gated delta rule does;
    in a chunk at gamma_t M_{c0}, gamma_t = prod_{m=c0+1..t} (1 - alpha_m) (Titans eq. 16
    has M_{c0} undecayed)."""
    memory = {n: w.copy() for n, w in weights.items()}
    surprise = {n: s.copy() for n, s in momentum.items()}
    outputs = []
    for t in range(len(x["k"])):
        keep = np.exp(x["log_decay"][t])  # 1 - alpha_t
        if starts_chunk(t, chunk_size):
            chunk_start, gamma = memory, 1.0
        gamma = gamma * keep
        point = {n: gamma * w for n, w in chunk_start.items()}  # = M~_t when chunk_size == 1
        grads = gradient(point, x["k"][t], x["v"][t])
        surprise = {n: x["momentum"][t] * surprise[n] - x["lr"][t] * grads[n] for n in grads}
        memory = {n: keep * memory[n] + surprise[n] for n in memory}
        outputs.append(read(memory, x["q"][t]))
    return np.stack(outputs), memory, surprise


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("architecture", ["matrix", "mlp"])
def test_momentum_rule_matches_written_out_titans(architecture, impl):
    """Titans' surprise with momentum (eqs. 9-10, 13-14) on a matrix memory and on Titans'
    own memory, the depth-2 GELU MLP with residual and LN written out; a nonzero carried
    momentum S_0 checks the eta_t S_{t-1} term from the first token."""
    spec = MemorySpec(architecture=architecture, rule="momentum", retention="gated_decay")
    if architecture == "matrix":
        key_dim, value_dim = KEY_DIM, VALUE_DIM
        gradient, read = matrix_memory_gradient, matrix_memory_read
    else:
        key_dim = value_dim = MLP_DIM
        eps = spec.norm_eps
        gradient = lambda w, k, v: mlp_memory_gradient(w, k, v, eps)  # noqa: E731
        read = lambda w, q: mlp_forward(w, q, eps)[0]  # noqa: E731
    inputs = make_inputs(4, key_dim, value_dim)
    rng = np.random.default_rng(5)
    shapes = spec.weight_shapes(key_dim, value_dim)
    weights = {n: rng.standard_normal((BATCH, HEADS, *s)) / math.sqrt(s[0])
               for n, s in shapes.items()}  # fmt: skip
    momentum = {n: 0.1 * rng.standard_normal((BATCH, HEADS, *s)) for n, s in shapes.items()}
    chunk_size = chunk_size_of(impl)
    expected_output, expected_weights, expected_momentum = per_head(
        titans_numpy, inputs, [weights, momentum], gradient=gradient, read=read,
        chunk_size=chunk_size,
    )  # fmt: skip
    output, final_weights, final_momentum = run_package(spec, inputs, weights, momentum, impl)
    assert max_relative_error(output, expected_output) < F64_TOL
    assert max_relative_error(final_weights, expected_weights) < F64_TOL
    assert max_relative_error(final_momentum, expected_momentum) < F64_TOL
    # Guard: the gradient term is not negligible next to the carried momentum.
    carried = {n: s * np.prod(inputs["momentum"], axis=1)[..., None, None]
               for n, s in momentum.items()}  # fmt: skip
    assert max_relative_error(carried, expected_momentum) > 1e-2
    if impl == "chunked-2":
        exact, _, _ = per_head(titans_numpy, inputs, [weights, momentum], gradient=gradient,
                               read=read, chunk_size=1)  # fmt: skip
        assert max_relative_error(exact, expected_output) > 1e-4
