"""Titans blocks (Behrouz et al. 2024, "Titans: Learning to Memorize at Test Time", §4),
registered as block kinds "lmm", "mal", "mag" (and "mac", in `models/titans_mac.py`).

All four wrap `layers.neural_memory.NeuralMemory` (the long-term memory, eqs. 8-18) and end
with + SwiGLU(RMSNorm(.)) like `models.lm.TransformerBlock`; the attention is
`layers.attention` (RoPE, sliding window). Persistent memory (eq. 19) is `num_persistent`
learned vectors [P, D] in the attention's input space, projected by its W_K, W_V and
prepended to the keys/values of every query, *without* RoPE (they have no position) and
always visible (outside the sliding window). Packed sequences (segment_ids): lmm, mal and
mag run each document as if alone (the memory restarts from M_0 at each document start,
attention stays inside the document; persistent tokens are seen by all); mac refuses them
(its segments are fixed windows of the row, which a document start would cut).

The gating ⊗ of MAG (eq. 28) and MAC (eq. 25) is the paper's "normalise both outputs with
learnable vector-valued weights, then a non-linearity": o = W_o(RMSNorm(y) ⊙ σ(RMSNorm(m)))
with σ the sigmoid and W_o a projection into the residual stream (the paper does not name
the non-linearity; W_o is ours, so the block writes the residual at the usual init scale).

Options (`model.<kind>`): the memory's (num_heads, head_dim: 0 = the model's; architecture,
depth, expansion, activation, bias, lp_p, retention, lq_q, rule, ns_steps, ns_coefficients,
omega_window, omega_gates: `MemorySpec`; feature_map, feature_degree: `layers.feature_maps`;
chunk_size, conv_size, impl; lr_max, 0 = `layers.neural_memory_init.default_lr_max`; gate_init_std),
plus window and rope_theta for the attention (mal, mag), num_persistent (mag, mac) and
segment_size (mac). The ATLAS / Miras kinds built from the
same memory are in `models.miras`. Decoding (`init_cache` / `extend`) exists for all four
and equals the full forward, chunk for chunk (see `layers.neural_memory` for the
chunk-aligned memory cache); MAC decodes token by token.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from errors import ConfigError
from layers import context_parallel
from layers.attention import (
    Attention,
    attention_mask,
    cache_attention_mask,
    dot_product_attention,
    sliding_window_attention,
    write_cache,
)
from layers.feature_maps import FEATURE_MAPS
from layers.mlp import SwiGLU
from layers.neural_memory import NeuralMemory
from layers.neural_memory_init import GATE_INIT_STD
from layers.norms import RMSNorm, rms_norm
from layers.sharding import projection, with_logical_axes
from models.registry import (
    compute_dtype_of,
    head_dim_of,
    init_std_of,
    mlp_dim_of,
    register_block,
    residual_out_init_std,
)
from pallas_kernels.dispatch import IMPLS
from pallas_kernels.neural_memory import MemorySpec


class _Block(nnx.Module):
    """Shared parts: the memory (its input pre-norm) and the closing SwiGLU residual."""

    def __init__(self, model_config, block_config, *, memory_out_std, rngs):
        d_model, self.dtype = model_config.d_model, compute_dtype_of(model_config)
        self.config = model_config
        self.memory_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=self.dtype, rngs=rngs)
        self.memory = build_memory(model_config, block_config, memory_out_std, rngs)
        self.mlp_norm = RMSNorm(d_model, eps=model_config.norm_eps, dtype=self.dtype, rngs=rngs)
        self.mlp = SwiGLU(
            d_model,
            mlp_dim_of(model_config),
            init_std=init_std_of(model_config),
            out_init_std=residual_out_init_std(model_config),
            dtype=self.dtype,
            rngs=rngs,
        )

    def memory_writes(self, x, *, positions):
        """What the memory writes (the probe contract): it reads RMSNorm(x) in LMM, MAL and
        MAG alike."""
        del positions
        return self.memory.writes(self.memory_norm(x))

    def _attention(self, block_config, rngs):
        return Attention(
            self.config.d_model,
            num_heads=self.config.num_heads,
            head_dim=head_dim_of(self.config),
            num_kv_heads=self.config.num_heads,
            window=block_config.get("window", 0),
            rope_theta=block_config.rope_theta,
            init_std=init_std_of(self.config),
            out_init_std=residual_out_init_std(self.config),
            dtype=self.dtype,
            rngs=rngs,
        )

    def _mlp_residual(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


class LMMBlock(_Block):
    """LMM (§4.3, the memory alone as a layer): x + NeuralMemory(RMSNorm(x)), then SwiGLU."""

    def __init__(self, model_config, block_config, *, rngs):
        out_std = residual_out_init_std(model_config)
        super().__init__(model_config, block_config, memory_out_std=out_std, rngs=rngs)

    def __call__(self, x, *, positions, segment_ids=None):
        del positions  # the recurrence knows the order
        y, aux = self.memory(self.memory_norm(x), segment_ids=segment_ids)
        return self._mlp_residual(x + y.astype(jnp.float32)), aux

    def init_cache(self, batch_size: int, max_length: int):
        del max_length  # the memory has a fixed size
        return self.memory.init_cache(batch_size)

    def extend(self, x, cache, *, positions):
        del positions
        y, cache = self.memory.extend(self.memory_norm(x), cache)
        return self._mlp_residual(x + y.astype(jnp.float32)), cache


class MALBlock(_Block):
    """MAL (§4.3, eqs. 29-31): y = M(x), o = SW-Attn(y), each a pre-norm residual, then SwiGLU.

    Departure: no persistent tokens in front of the memory (eq. 29's [p ‖ x]): a fixed
    prefix run through the memory only moves its start state, which M_0 already learns.
    """

    def __init__(self, model_config, block_config, *, rngs):
        out_std = residual_out_init_std(model_config)
        super().__init__(model_config, block_config, memory_out_std=out_std, rngs=rngs)
        self.attention_norm = RMSNorm(
            model_config.d_model, eps=model_config.norm_eps, dtype=self.dtype, rngs=rngs
        )
        self.attention = self._attention(block_config, rngs)

    def __call__(self, x, *, positions, segment_ids=None):
        y, aux = self.memory(self.memory_norm(x), segment_ids=segment_ids)
        x = x + y.astype(jnp.float32)
        attended = self.attention(
            self.attention_norm(x), positions=positions, segment_ids=segment_ids
        )
        return self._mlp_residual(x + attended.astype(jnp.float32)), aux

    def init_cache(self, batch_size: int, max_length: int):
        return {
            "memory": self.memory.init_cache(batch_size),
            "attention": self.attention.init_cache(batch_size, max_length),
        }

    def extend(self, x, cache, *, positions):
        y, memory_cache = self.memory.extend(self.memory_norm(x), cache["memory"])
        x = x + y.astype(jnp.float32)
        attended, attention_cache = self.attention.extend(
            self.attention_norm(x), cache["attention"], positions=positions
        )
        x = x + attended.astype(jnp.float32)
        return self._mlp_residual(x), {"memory": memory_cache, "attention": attention_cache}


class GatedAttentionBlock(_Block):
    """Blocks with attention over [persistent ‖ ...] and the gate ⊗ (MAG, MAC)."""

    def __init__(self, model_config, block_config, *, rngs):
        init_std, d_model = init_std_of(model_config), model_config.d_model
        super().__init__(model_config, block_config, memory_out_std=init_std, rngs=rngs)
        self.attention = self._attention(block_config, rngs)
        # Inputs of the attention are RMS-normalised, so persistent tokens start at unit scale.
        self.persistent = nnx.Param(
            with_logical_axes(nnx.initializers.normal(1.0), "persistent", "embed")(
                rngs.params(), (block_config.num_persistent, d_model), jnp.float32
            )
        )
        norm_init = with_logical_axes(nnx.initializers.ones, "norm")
        self.attention_scale = nnx.Param(norm_init(None, (d_model,), jnp.float32))
        self.memory_scale = nnx.Param(norm_init(None, (d_model,), jnp.float32))
        self.gate_out = projection(
            d_model,
            d_model,
            std=residual_out_init_std(model_config),
            axes=("qkv", "embed"),
            dtype=self.dtype,
            rngs=rngs,
        )
        self.eps = model_config.norm_eps

    def persistent_key_value(self, batch, num_heads, head_dim):
        """Keys and values of the persistent tokens, [B, P, K, hd] each (no RoPE: they have
        no position)."""
        tokens = self.persistent[...].astype(self.dtype)
        shape = (batch, tokens.shape[0], num_heads, head_dim)
        key = jnp.broadcast_to(self.attention.key(tokens).reshape(shape[1:]), shape)
        value = jnp.broadcast_to(self.attention.value(tokens).reshape(shape[1:]), shape)
        return key, value

    def attend(self, query, key, value, mask):
        """Attention of query [B, Tq, H, hd] over [persistent ‖ key] with `mask` [B, Tq, Tk]
        on the non-persistent keys (persistent ones are always visible) -> [B, Tq, D]."""
        batch, num_heads, head_dim = query.shape[0], key.shape[2], key.shape[3]
        persistent_key, persistent_value = self.persistent_key_value(batch, num_heads, head_dim)
        keys = jnp.concatenate([persistent_key.astype(key.dtype), key], axis=1)
        values = jnp.concatenate([persistent_value.astype(value.dtype), value], axis=1)
        always = jnp.ones(mask.shape[:2] + (persistent_key.shape[1],), bool)
        mask = jnp.concatenate([always, mask], axis=-1)
        return self.attention.output(dot_product_attention(query, keys, values, mask))

    def gate(self, attended, remembered):
        """⊗ of eqs. 25 / 28: W_o(RMSNorm(y) ⊙ sigmoid(RMSNorm(m)))."""
        y = rms_norm(attended, self.attention_scale[...], self.eps)
        m = rms_norm(remembered, self.memory_scale[...], self.eps)
        return self.gate_out((y * jax.nn.sigmoid(m)).astype(self.dtype)).astype(jnp.float32)


class MAGBlock(GatedAttentionBlock):
    """MAG (§4.2, eqs. 26-28): y = SW-Attn*([p ‖ x]), o = y ⊗ M(x), as one pre-norm residual
    x + o on x̂ = RMSNorm(x), then SwiGLU.

    Departures: the memory branch reads x, not [p ‖ x] (as in MAL, a fixed prefix only
    shifts M_0, which is learned); ⊗ as in the module docstring.
    """

    def __call__(self, x, *, positions, segment_ids=None):
        normed = self.memory_norm(x)
        remembered, aux = self.memory(normed, segment_ids=segment_ids)
        query, key, value = self.attention.project(normed, positions)
        window = self.attention.window
        if 0 < window and context_parallel.context_size() > 1:  # T split over "context"
            prefix = self.persistent_key_value(x.shape[0], key.shape[2], key.shape[3])
            heads = context_parallel.halo_sliding_window_attention(
                query, key, value, window=window, segment_ids=segment_ids,
                prefix_key=prefix[0], prefix_value=prefix[1],
            )  # fmt: skip
            attended = self.attention.output(heads)
        elif 0 < window and 2 * window < x.shape[1]:  # O(T * window), as `Attention`
            prefix = self.persistent_key_value(x.shape[0], key.shape[2], key.shape[3])
            heads = sliding_window_attention(
                query, key, value, window=window, segment_ids=segment_ids,
                prefix_key=prefix[0], prefix_value=prefix[1],
            )  # fmt: skip
            attended = self.attention.output(heads)
        else:
            index = jnp.arange(x.shape[1])
            mask = attention_mask(index, index, window=window, query_segments=segment_ids)
            attended = self.attend(query, key, value, mask)
        return self._mlp_residual(x + self.gate(attended, remembered)), aux

    def init_cache(self, batch_size: int, max_length: int):
        return {
            "memory": self.memory.init_cache(batch_size),
            "attention": self.attention.init_cache(batch_size, max_length),
        }

    def extend(self, x, cache, *, positions):
        normed = self.memory_norm(x)
        remembered, memory_cache = self.memory.extend(normed, cache["memory"])
        query, key, value = self.attention.project(normed, positions)
        kv_cache = cache["attention"]
        # Attend over [cache ‖ new] before writing: a new token may overwrite a ring slot
        # an earlier new query still sees (as `Attention.extend` does for windows).
        keys = jnp.concatenate([kv_cache["key"], key.astype(kv_cache["key"].dtype)], axis=1)
        values = jnp.concatenate([kv_cache["value"], value.astype(kv_cache["value"].dtype)], 1)
        key_positions = jnp.concatenate([kv_cache["key_positions"], positions], axis=1)
        mask = cache_attention_mask(positions, key_positions, window=self.attention.window)
        attended = self.attend(query, keys, values, mask)
        new_cache = {
            "memory": memory_cache,
            "attention": write_cache(kv_cache, key, value, positions),
        }
        return self._mlp_residual(x + self.gate(attended, remembered)), new_cache


# The memory's four choices and their parameters are MemorySpec's fields, with its defaults
# (its eps fields stay internal; norm_eps comes from model.norm_eps).
SPEC_OPTIONS = tuple(
    field.name
    for field in dataclasses.fields(MemorySpec)
    if field.name not in ("norm_eps", "lp_eps", "lq_eps")
)
_SPEC_DEFAULTS = MemorySpec()
MEMORY_DEFAULTS = {
    "num_heads": 0,
    "head_dim": 0,
    **{name: getattr(_SPEC_DEFAULTS, name) for name in SPEC_OPTIONS},
    "feature_map": "identity",  # or "monomial" (ATLAS's φ_p), "polynomial" (element-wise)
    "feature_degree": 2,
    "chunk_size": 16,
    "conv_size": 4,
    "lr_max": 0.0,  # 0: layers.neural_memory_init.default_lr_max (the inner step's stability edge)
    "gate_init_std": GATE_INIT_STD,  # 0: θ, η, α start at their biases for every token
    "impl": "auto",
}
ATTENTION_DEFAULTS = {"window": 256, "rope_theta": 10000.0}


def _as_field_type(name, value):
    """A config value as MemorySpec's field wants it (floats from ints, tuples from lists)."""
    default = getattr(_SPEC_DEFAULTS, name)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(float(item) for item in value)
    return value


def build_memory(model_config, block_config, out_init_std, rngs):
    """NeuralMemory from the block's options (ConfigError names the option, no prefix)."""
    minimums = (
        ("num_heads", 0),
        ("head_dim", 0),
        ("chunk_size", 1),
        ("conv_size", 0),
        ("feature_degree", 1),
    )
    for key, minimum in minimums:
        if block_config[key] < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {block_config[key]}")
    if not block_config.lr_max >= 0:
        raise ConfigError(f"lr_max: must be > 0 (or 0: the default), got {block_config.lr_max}")
    if block_config.impl not in IMPLS:
        raise ConfigError(f"impl: {block_config.impl!r} is not one of {', '.join(IMPLS)}")
    if block_config.feature_map not in FEATURE_MAPS:
        known = ", ".join(FEATURE_MAPS)
        raise ConfigError(f"feature_map: {block_config.feature_map!r} is not one of {known}")
    try:
        spec = MemorySpec(
            **{name: _as_field_type(name, block_config[name]) for name in SPEC_OPTIONS},
            norm_eps=model_config.norm_eps,
        )
    except ValueError as error:  # "MemorySpec.<field>=...; expected one of ..."
        raise ConfigError(str(error).removeprefix("MemorySpec.")) from None
    return NeuralMemory(
        model_config.d_model,
        num_heads=block_config.num_heads or model_config.num_heads,
        head_dim=block_config.head_dim or head_dim_of(model_config),
        spec=spec,
        chunk_size=block_config.chunk_size,
        conv_size=block_config.conv_size,
        lr_max=block_config.lr_max or None,
        impl=block_config.impl,
        norm_eps=model_config.norm_eps,
        init_std=init_std_of(model_config),
        out_init_std=out_init_std,
        gate_init_std=block_config.gate_init_std,
        feature_map=block_config.feature_map,
        feature_degree=block_config.feature_degree,
        dtype=compute_dtype_of(model_config),
        rngs=rngs,
    )


def register_memory_block(kind, block_class, defaults):
    def factory(model_config, block_config, *, layer_index, rngs):
        del layer_index  # every layer of a kind is built the same way
        if block_config.get("window", 0) < 0:
            raise ConfigError(f"window: must be >= 0, got {block_config.window}")
        if block_config.get("num_persistent", 1) < 1:
            raise ConfigError(f"num_persistent: must be >= 1, got {block_config.num_persistent}")
        if block_config.get("segment_size", 1) < 1:
            raise ConfigError(f"segment_size: must be >= 1, got {block_config.segment_size}")
        if "rope_theta" in block_config and head_dim_of(model_config) % 2:
            raise ConfigError("model.head_dim: RoPE needs an even head_dim")
        return block_class(model_config, block_config, rngs=rngs)

    register_block(kind, defaults=defaults)(factory)


register_memory_block("lmm", LMMBlock, MEMORY_DEFAULTS)
register_memory_block("mal", MALBlock, {**MEMORY_DEFAULTS, **ATTENTION_DEFAULTS})
register_memory_block(
    "mag", MAGBlock, {**MEMORY_DEFAULTS, **ATTENTION_DEFAULTS, "num_persistent": 4}
)
