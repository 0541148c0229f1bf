"""Short causal depthwise convolution (kernel 4 by default), as in front of the q/k/v of
Mamba, DeltaNet and Gated DeltaNet (Yang et al. 2025, §3.4; flash-linear-attention's
`ShortConvolution`).

    y_t = Σ_{j=0}^{K-1} w_j ⊙ x_{t-j}        (w: [K, C], one filter per channel)

Tokens before the start of the sequence come from a `conv_state` (the last K-1 inputs of
what came before, for decoding) or are zero. With `segment_ids` a tap never reaches into an
earlier document of a packed row. `subsequence_causal_conv` runs the same filter over only
the tokens a mask selects, as if the others were not there (Mixture-of-Memories keys and
values: each memory sees its own routed tokens only).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from layers.cpu_layouts import materialised_cotangent
from layers.sharding import with_logical_axes


def conv_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch's Conv1d default for a depthwise filter: U(-1/sqrt(K), 1/sqrt(K)), fan_in = K.

    The tap axis is the second-to-last one ([..., K, C]), so stacked filters work too.
    """
    bound = shape[-2] ** -0.5
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def _reset_counts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int: number of segment changes at or before each token (0 in the first one)."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1]), jnp.cumsum(changed, axis=1, dtype=segment_ids.dtype)],
        axis=1,
    )


def causal_depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    conv_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise conv of x [B, T, C] with kernel [K, C] (kernel[K-1] hits the current
    token, as in a left-padded PyTorch Conv1d).

    conv_state [B, K-1, C]: the K-1 inputs before x (zeros when None). segment_ids [B, T]:
    a tap is kept only if it reads the same segment as the output token; the conv_state
    counts as part of the first segment. Returns (y [B, T, C] in x's dtype, accumulated in
    float32; the new conv_state [B, K-1, C], the last K-1 inputs of [conv_state ‖ x]).
    """
    # x is usually a projection's output: keep its cotangent out of the weight gradient's
    # transposing fusion on CPU (`layers.cpu_layouts`: projection + conv 2.2x faster, fwd + bwd).
    return _depthwise_conv(materialised_cotangent(x), kernel, conv_state, segment_ids)


def _depthwise_conv(x, kernel, conv_state, segment_ids):
    batch_size, length, channels = x.shape
    taps = kernel.shape[0]
    if conv_state is None:
        conv_state = jnp.zeros((batch_size, taps - 1, channels), x.dtype)
    padded = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    if segment_ids is not None:
        resets = _reset_counts(segment_ids)
        padded_resets = jnp.concatenate([jnp.zeros_like(resets[:, : taps - 1]), resets], axis=1)
    y = jnp.zeros((batch_size, length, channels), jnp.float32)
    for tap in range(taps):  # K is tiny (4): an unrolled sum of shifted products
        window = padded[:, tap : tap + length].astype(jnp.float32)
        if segment_ids is not None:
            same_segment = padded_resets[:, tap : tap + length] == resets
            window = jnp.where(same_segment[..., None], window, 0.0)
        y = y + window * kernel[tap].astype(jnp.float32)
    new_state = padded[:, length:]  # the last K-1 rows of [conv_state ‖ x]
    return y.astype(x.dtype), new_state


def subsequence_causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    selected: jax.Array,
    *,
    conv_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`causal_depthwise_conv` over only the tokens where `selected` [B, T] is True.

    The selected tokens are gathered to the front of the row (order kept), convolved as one
    sequence after `conv_state`, and scattered back. The output at an unselected token is
    the output of the last selected token before it (it is meant to be masked by the
    caller); the new conv_state holds the last K-1 *selected* inputs, so a sequence with
    unselected tokens leaves exactly the state it would leave without them.

    Unlike `causal_depthwise_conv` it leaves x's cotangent to the caller: it runs under
    `vmap` (one call per memory), where `materialised_cotangent`'s conditional would become a
    select that XLA fuses through, so the caller applies it to the projection outside the vmap.
    """
    batch_size, length, channels = x.shape
    taps = kernel.shape[0]
    if conv_state is None:
        conv_state = jnp.zeros((batch_size, taps - 1, channels), x.dtype)
    # Stable sort: selected tokens first, each group in its original order.
    order = jnp.argsort(~selected, axis=1, stable=True)
    compacted = jnp.take_along_axis(x, order[..., None], axis=1)
    compacted_segments = None
    if segment_ids is not None:
        compacted_segments = jnp.take_along_axis(segment_ids, order, axis=1)
    y, _ = _depthwise_conv(compacted, kernel, conv_state, compacted_segments)
    rank = jnp.maximum(jnp.cumsum(selected, axis=1) - 1, 0)  # index in the compacted row
    y = jnp.take_along_axis(y, rank[..., None], axis=1)
    # New state: rows n .. n+K-2 of [conv_state ‖ compacted], n = number of selected tokens.
    padded = jnp.concatenate([conv_state.astype(x.dtype), compacted], axis=1)
    count = jnp.sum(selected, axis=1, dtype=jnp.int32)
    state_rows = count[:, None] + jnp.arange(taps - 1)[None, :]
    new_state = jnp.take_along_axis(padded, state_rows[..., None], axis=1)
    return y, new_state


class ShortConv(nnx.Module):
    """Depthwise causal conv over `channels` with `kernel_size` taps, no bias (as fla's
    default), optionally followed by SiLU. The filter's logical axes are (conv, qkv)."""

    def __init__(self, channels: int, kernel_size: int = 4, *, activation: bool = True, rngs):
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel = nnx.Param(
            with_logical_axes(conv_kernel_init, "conv", "qkv")(
                rngs.params(), (kernel_size, channels), jnp.float32
            )
        )
        self.kernel_size = kernel_size
        self.channels = channels
        self.activation = activation

    def init_state(self, batch_size: int) -> jax.Array:
        """Zero conv_state [B, K-1, C] (float32; cast to the input dtype when used)."""
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), jnp.float32)

    def __call__(self, x, *, conv_state=None, segment_ids=None):
        """x [B, T, C] -> (y [B, T, C], new conv_state [B, K-1, C] float32)."""
        y, new_state = causal_depthwise_conv(
            x, self.kernel[...], conv_state=conv_state, segment_ids=segment_ids
        )
        if self.activation:
            y = jax.nn.silu(y)
        return y, new_state.astype(jnp.float32)
