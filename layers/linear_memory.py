"""The matrix-memory mixer: linear attention, GLA, DeltaNet and Gated DeltaNet in one layer.

The layer around the recurrence follows Gated DeltaNet (Yang et al. 2025, "Gated Delta
Networks", §3.4 and Fig. 1) and flash-linear-attention's `GatedDeltaNet` layer:

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))
    q, k    = q / ‖q‖, k / ‖k‖                           (per head)
    β_t     = sigmoid(x_t W_β)                           (per head; delta rules)
    g_t     = -exp(A_log) · softplus(x_t W_a + dt_bias)   (log decay per head; gla, gdn)
    o       = recurrence(q, k, v, g, β)                  (pallas_kernels.linear_memory)
    y       = (RMSNorm(o) ⊙ SiLU(x W_gate)) W_out        (RMSNorm per head)

`rule` picks the recurrence (state S ∈ R^{Dk×Dv} per head, o_t = Dk^-1/2 S_t^T q_t):

    linear_attention   S_t = S_{t-1} + k_t v_t^T
    gla                S_t = exp(g_t) S_{t-1} + k_t v_t^T
    deltanet           S_t = S_{t-1} + β_t k_t (v_t - S_{t-1}^T k_t)^T
    gated_deltanet     S_t = exp(g_t) S_{t-1} + β_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T

Linear attention as Katharopoulos et al. (2020, "Transformers are RNNs") define it is the
"linear_attention" rule with `feature_map="elu1"` and `normalize=True` (the block kind's
defaults): q, k = elu(·) + 1 instead of ℓ2(SiLU(·)), and o_t = S_t^T q_t / (z_t^T q_t + ε)
with z_t = Σ_{j≤t} k_j (`pallas_kernels.linear_memory.normalized_recurrence`). The short
convs, SiLU on v and the SiLU output gate are this layer's, not the paper's; the output's
RMSNorm is left out, since it would undo the normaliser.

"gla" is GLA with one scalar gate per head and step (fla's "simple GLA", the decay of
Mamba2 / Gated DeltaNet), not GLA's per-key-channel gate: the recurrence API takes g [B,T,H].

Decoding: `init_cache` gives the matrix state and the conv states (last K-1 pre-conv
inputs of q, k, v); `extend` continues a cached sequence by T tokens.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.gated_output import GatedOutput
from layers.memory_writes import MatrixMemoryWrites
from layers.norms import l2_normalize
from layers.sharding import projection, with_logical_axes
from layers.short_conv import ShortConv
from pallas_kernels import linear_memory as recurrences
from pallas_kernels.linear_memory.api import DECAY_RULES, DELTA_RULES, RULES  # noqa: F401


def a_log_init(key, shape, dtype=jnp.float32):
    """A_log = log A with A ~ U(1, 16) per head (Mamba2's A_init_range; fla's GDN draws
    from (0, 16), whose lower end can give log 0)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, minval=1.0, maxval=16.0))


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
    """Mamba2 / GDN: dt log-uniform in [dt_min, dt_max] (floored), stored as softplus^-1(dt)
    so that softplus(0 + dt_bias) = dt at init."""
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def decay_parameters(num_heads: int, rngs: nnx.Rngs):
    """Per-head A_log and dt_bias of the Gated-DeltaNet decay (Mamba2 init), float32."""
    a_log = with_logical_axes(a_log_init, "heads")(rngs.params(), (num_heads,), jnp.float32)
    dt_bias = with_logical_axes(dt_bias_init, "heads")(rngs.params(), (num_heads,), jnp.float32)
    return nnx.Param(a_log), nnx.Param(dt_bias)


def log_decay(a_logits: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> jax.Array:
    """GDN / Mamba2 data-dependent log decay g = -exp(A_log) softplus(a + dt_bias), float32."""
    a_logits = a_logits.astype(jnp.float32)
    return -jnp.exp(a_log) * jax.nn.softplus(a_logits + dt_bias)


def elu_plus_one(x: jax.Array) -> jax.Array:
    """φ(x) = elu(x) + 1 > 0, linear attention's feature map (Katharopoulos et al. 2020)."""
    return jax.nn.elu(x) + 1.0


# What q and k go through after the short conv (per head, [..., Dk]): "silu_l2" is Gated
# DeltaNet's (the delta rules need ‖k‖ = 1), "elu1" linear attention's positive map.
FEATURE_MAPS = {
    "silu_l2": lambda x: l2_normalize(jax.nn.silu(x)),
    "elu1": elu_plus_one,
}


def state_norm(state: jax.Array) -> jax.Array:
    """Mean Frobenius norm of the per-head states [..., Dk, Dv] (a logged metric)."""
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(state), axis=(-2, -1))))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatrixMemoryOptions:
    """The options of a matrix-memory mixer: `LinearMemory`'s keyword arguments, and those
    of every memory in `MixtureOfMemories`.

    rule:          the recurrence, one of RULES.
    num_heads:     heads; head_dim is each head's key width, head_dim * expand_v its value width.
    conv_size:     short-convolution taps on q, k, v (0 disables them; SiLU is kept).
    chunk_size, impl: the recurrence's chunk length and implementation.
    norm_eps:      the output RMSNorm's epsilon.
    init_std:      std of the projections into the heads; out_init_std of the output one.
    dtype:         matmul dtype (parameters, norms, gates and the state stay float32).
    """

    rule: str
    num_heads: int
    head_dim: int
    expand_v: int = 1
    conv_size: int = 4
    chunk_size: int = 64
    impl: str = "auto"
    norm_eps: float = 1e-6
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r} is not one of {RULES}")


class MatrixMemoryMixer(nnx.Module):
    """What the matrix-memory mixers share: their options as attributes, and the gated
    output that reads their memories."""

    def _set_options(self, options: MatrixMemoryOptions):
        self.rule = options.rule
        self.num_heads, self.key_dim = options.num_heads, options.head_dim
        self.value_dim = options.head_dim * options.expand_v
        self.conv_size, self.chunk_size, self.impl = (
            options.conv_size,
            options.chunk_size,
            options.impl,
        )
        self.dtype = options.dtype

    def _gated_output(self, d_model, options: MatrixMemoryOptions, rngs, norm=True):
        return GatedOutput(
            d_model,
            options.num_heads,
            self.value_dim,
            eps=options.norm_eps,
            init_std=options.init_std,
            out_init_std=options.out_init_std,
            dtype=options.dtype,
            rngs=rngs,
            norm=norm,
        )


class LinearMemory(MatrixMemoryMixer):
    """Matrix-memory mixer (see the module docstring). x [B, T, D] -> y [B, T, D].

    `options` are the fields of `MatrixMemoryOptions` (rule, num_heads and head_dim are
    required). feature_map: what q and k go through after the conv, one of FEATURE_MAPS;
    normalize: divide each readout by z_t^T q_t (additive rules only; see the module
    docstring).
    """

    def __init__(
        self,
        d_model: int,
        *,
        feature_map: str = "silu_l2",
        normalize: bool = False,
        rngs: nnx.Rngs,
        **options,
    ):
        options = MatrixMemoryOptions(**options)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r} is not one of {tuple(FEATURE_MAPS)}")
        if normalize and options.rule in DELTA_RULES:
            raise ValueError(f"normalize=True needs an additive rule, not {options.rule!r}")
        self._set_options(options)
        self.feature_map, self.normalize = feature_map, normalize

        def linear(features_out, axes):
            return projection(
                d_model, features_out, std=options.init_std, axes=axes, dtype=self.dtype, rngs=rngs
            )

        num_heads = self.num_heads
        key_width, value_width = num_heads * self.key_dim, num_heads * self.value_dim
        self.query = linear(key_width, ("embed", "qkv"))
        self.key = linear(key_width, ("embed", "qkv"))
        self.value = linear(value_width, ("embed", "qkv"))
        if self.conv_size > 0:
            # Activations are the feature map's (q, k) and SiLU (v), applied in `features`.
            for name, width in (("query", key_width), ("key", key_width), ("value", value_width)):
                conv = ShortConv(width, self.conv_size, activation=False, rngs=rngs)
                setattr(self, f"{name}_conv", conv)
        if self.rule in DELTA_RULES:
            self.beta = linear(num_heads, ("embed", "heads"))
        if self.rule in DECAY_RULES:
            self.decay = linear(num_heads, ("embed", "heads"))
            self.a_log, self.dt_bias = decay_parameters(num_heads, rngs)
        # A per-head RMSNorm would divide the normaliser out again (RMSNorm(o / c) = RMSNorm(o)
        # for any per-(token, head) c > 0, up to its eps), so with it the output has none.
        self.output = self._gated_output(d_model, options, rngs, norm=not normalize)

    def _conv(self, name, projected, cache, new_cache, segment_ids):
        """ShortConv(projected) with the cached conv state `name` (if caching); projected
        itself when conv_size is 0."""
        if self.conv_size == 0:
            return projected
        conv = getattr(self, f"{name}_conv")
        conv_state = None if cache is None else cache[f"conv_{name}"]
        y, new_conv_state = conv(projected, conv_state=conv_state, segment_ids=segment_ids)
        new_cache[f"conv_{name}"] = new_conv_state
        return y

    def features(self, x, *, cache=None, segment_ids=None):
        """x [B, T, D] -> (q, k [B,T,H,Dk], v [B,T,H,Dv], g, beta [B,T,H] float32 or None,
        the updated conv states {conv_q, conv_k, conv_v})."""
        batch, length, _ = x.shape
        new_cache = {}
        heads = (batch, length, self.num_heads)
        q, k, v = (
            self._conv(name, getattr(self, name)(x), cache, new_cache, segment_ids)
            for name in ("query", "key", "value")
        )
        feature_map = FEATURE_MAPS[self.feature_map]
        q, k = (feature_map(y.reshape(*heads, -1)) for y in (q, k))
        v = jax.nn.silu(v).reshape(*heads, -1)
        g = beta = None
        if self.rule in DECAY_RULES:
            g = log_decay(self.decay(x), self.a_log[...], self.dt_bias[...])
        if self.rule in DELTA_RULES:
            beta = jax.nn.sigmoid(self.beta(x).astype(jnp.float32))
        return q, k, v, g, beta, new_cache

    def writes(self, x) -> MatrixMemoryWrites:
        """What the memory writes reading x [B, T, D] (the probe contract)."""
        q, k, v, g, beta, _ = self.features(x)
        return MatrixMemoryWrites(self.rule, q, k, v, g, beta, normalize=self.normalize)

    def _recurrence(self, q, k, v, g, beta, *, initial_state=None, segment_ids=None):
        options = dict(
            initial_state=initial_state,
            output_final_state=True,
            segment_ids=segment_ids,
            # A decoding step (T = 1) need not pad to a whole chunk of 64.
            chunk_size=min(self.chunk_size, q.shape[1]),
            impl=self.impl,
        )
        if self.normalize:
            return recurrences.normalized_recurrence(self.rule, q, k, v, g, **options)
        return recurrences.recurrence(self.rule, q, k, v, g, beta, **options)

    def __call__(self, x, *, segment_ids=None):
        """x [B, T, D] -> (y [B, T, D] in `dtype`, aux {"state_norm": final state's mean norm})."""
        q, k, v, g, beta, _ = self.features(x, segment_ids=segment_ids)
        if context_parallel.context_size() > 1:  # T split over the mesh's "context" axis
            o, final_state = context_parallel.matrix_memory(
                self.rule, q, k, v, g, beta, segment_ids=segment_ids,
                chunk_size=self.chunk_size, impl=self.impl, normalize=self.normalize,
            )  # fmt: skip
        else:
            o, final_state = self._recurrence(q, k, v, g, beta, segment_ids=segment_ids)
        memory = final_state[..., : self.value_dim]  # S without the normaliser's z column
        return self.output(o, x), {"state_norm": state_norm(memory)}

    def init_cache(self, batch_size: int) -> dict[str, jax.Array]:
        """Empty memory: state [B, H, Dk, Dv] ([B, H, Dk, Dv + 1] with the normaliser's z as
        its last column) and conv states [B, K-1, C], all float32 zeros."""
        shape = (batch_size, self.num_heads, self.key_dim, self.value_dim + int(self.normalize))
        cache = {"state": jnp.zeros(shape, jnp.float32)}
        if self.conv_size > 0:
            for name in ("query", "key", "value"):
                cache[f"conv_{name}"] = getattr(self, f"{name}_conv").init_state(batch_size)
        return cache

    def extend(self, x, cache):
        """Continue the cached sequence with x [B, T, D] -> (y [B, T, D], new cache)."""
        q, k, v, g, beta, new_cache = self.features(x, cache=cache)
        o, new_cache["state"] = self._recurrence(q, k, v, g, beta, initial_state=cache["state"])
        return self.output(o, x), new_cache
