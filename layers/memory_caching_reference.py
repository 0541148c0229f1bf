"""The naive form of memory caching (`layers.memory_caching`), the oracle of its tests.

An explicit Python loop over segments: run the wrapped memory over one segment from the
previous segment's final state, then read every cached state separately, score it, select
(ssc: by rank, not `lax.top_k`), and combine the reads with an explicit softmax over that
list. Nothing here is batched over segments
or masked, so it cannot share a mistake of the fast form's masks, reshapes or top-k. It
shares the layer's features, gate projection and output (not what is under test); the Gated
DeltaNet segments run the token-by-token `reference` recurrence, the neural memory's the
layer's chunked `recur` (the chunked form is that memory's definition).
"""

import jax.numpy as jnp

from layers.memory_caching import GatedDeltaNetMemoryCaching, reject_packing
from pallas_kernels import linear_memory
from pallas_kernels.neural_memory import NeuralMemoryState


def _combine(layer, online, reads, cached_means, u, keys):
    """One segment of L tokens: online [B, L, H, Dv], reads: a list of [B, L, H, Dv] (one per
    cached state), cached_means: their mean keys [B, H, Dk], u / keys [B, L, H, Dk]."""
    if layer.aggregation == "residual":
        return online + sum(reads, jnp.zeros_like(online))
    seen = jnp.arange(1, keys.shape[1] + 1, dtype=jnp.float32)[None, :, None, None]
    current_mean = jnp.cumsum(keys, axis=1) / seen  # causal: the segment's keys so far
    current = jnp.sum(u * current_mean, axis=-1)  # [B, L, H]
    scores = [jnp.sum(u * mean[:, None], axis=-1) for mean in cached_means]
    kept = [jnp.ones_like(score, bool) for score in scores]
    if layer.aggregation == "ssc":  # keep a state if fewer than top_k others score higher
        ranks = [sum((other > score).astype(jnp.int32) for other in scores) for score in scores]
        kept = [rank < layer.top_k for rank in ranks]
    largest = current
    for score, keep in zip(scores, kept, strict=True):
        largest = jnp.maximum(largest, jnp.where(keep, score, current))
    total = jnp.exp(current - largest)
    numerator = total[..., None] * online
    for score, keep, read in zip(scores, kept, reads, strict=True):
        weight = jnp.where(keep, jnp.exp(score - largest), 0.0)
        total = total + weight
        numerator = numerator + weight[..., None] * read
    return numerator / total[..., None]


def forward(layer, x, *, segment_ids=None):
    """What `layer(x)` computes (a `GatedDeltaNetMemoryCaching` or `NeuralMemoryCaching`),
    segment by segment: x [B, T, D] -> y [B, T, D]."""
    reject_packing(segment_ids)
    is_matrix = isinstance(layer, GatedDeltaNetMemoryCaching)
    if is_matrix:
        q, k, v, g, beta, _ = layer.memory.features(x)
        state = jnp.zeros((*q.shape[:1], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    else:
        inputs, _ = layer.memory.features(x)
        q, k = inputs.q, inputs.k
        state = layer.memory.initial_state(x.shape[0])
    u = layer._gate_queries(x)
    cached, outputs = [], []  # cached: (state, mean key) of every finished segment
    for start in range(0, x.shape[1], layer.segment_size):
        part = slice(start, min(start + layer.segment_size, x.shape[1]))
        if is_matrix:
            online, state = linear_memory.recurrence(
                "gated_deltanet", q[:, part], k[:, part], v[:, part], g[:, part],
                beta[:, part], initial_state=state, output_final_state=True, impl="reference",
            )  # fmt: skip
            scale = q.shape[-1] ** -0.5
            reads = [scale * jnp.einsum("blhk,bhkv->blhv", q[:, part], s) for s, _ in cached]
        else:
            segment_inputs = inputs.map(lambda name, a, part=part: a[:, part])
            online, state = layer.memory.recur(segment_inputs, state)
            reads = [
                layer.memory.read(NeuralMemoryState(w, None, None), q[:, part]) for w, _ in cached
            ]
        u_part = None if u is None else u[:, part]
        means = [mean for _, mean in cached]
        y = _combine(layer, online.astype(jnp.float32), reads, means, u_part, k[:, part])
        outputs.append(y.astype(online.dtype))
        finished = state if is_matrix else state.weights
        cached.append((finished, jnp.mean(k[:, part], axis=1)))
    return layer._output(jnp.concatenate(outputs, axis=1), x)
