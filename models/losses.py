"""Next-token cross-entropy from hidden states, optionally chunked over the sequence.

The [B, T, V] logits are usually an LM's largest activation (V is often 10-100x D). With
`chunk_size > 0` the sequence is cut into chunks; each chunk's logits are computed, reduced
to its loss terms and dropped, under `jax.checkpoint` so the backward pass recomputes them
chunk by chunk too. Neither pass then holds more than [B, chunk, V].
"""

import functools

import jax
import jax.numpy as jnp


def _terms(hidden, output_kernel, targets, mask, compute_dtype):
    """(sum of masked cross-entropy, number of masked argmax hits) for one stretch of tokens.

    CE_t = logsumexp_v(z_tv) - z_t,target with z = h W, float32 logits.
    """
    logits = jnp.einsum(
        "btd,dv->btv",
        hidden.astype(compute_dtype),
        output_kernel.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weight = mask.astype(jnp.float32)
    ce_sum = jnp.sum((log_normalizer - target_logit) * weight)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce_sum, jnp.sum(hits * weight)


def cross_entropy_terms(
    hidden: jax.Array,
    output_kernel: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 0,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Masked next-token loss terms: (ce_sum, correct), float32 scalars.

    hidden [B, T, D], output_kernel [D, V], targets [B, T] int, mask [B, T] (bool or 0/1).
    `chunk_size = 0` computes all logits at once; `chunk_size > 0` scans over sequence
    chunks of that length (a ragged tail is padded with mask 0). The logits matmul takes
    its inputs in `compute_dtype` and accumulates in float32.
    """
    targets = targets.astype(jnp.int32)
    length = hidden.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        return _terms(hidden, output_kernel, targets, mask, compute_dtype)

    num_chunks = -(-length // chunk_size)
    padding = num_chunks * chunk_size - length
    if padding:
        hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padding)))
        mask = jnp.pad(mask, ((0, 0), (0, padding)))

    def to_chunks(x):  # [B, n * c, ...] -> [n, B, c, ...], the scan axis first
        return jnp.swapaxes(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    chunk_terms = jax.checkpoint(functools.partial(_terms, compute_dtype=compute_dtype))

    def accumulate(totals, chunk):
        hidden_chunk, target_chunk, mask_chunk = chunk
        ce_sum, correct = chunk_terms(hidden_chunk, output_kernel, target_chunk, mask_chunk)
        return (totals[0] + ce_sum, totals[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, correct), _ = jax.lax.scan(
        accumulate, (zero, zero), (to_chunks(hidden), to_chunks(targets), to_chunks(mask))
    )
    return ce_sum, correct
