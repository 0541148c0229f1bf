"""Context parallelism: each sequence split along T over the mesh axis "context".

Active while a step is traced under `jax.set_mesh(mesh)` with a "context" axis of size
N > 1 (`training.sharding`; `--config.mesh.context=N`). Activations [B, T, ...] are then laid
out with the batch over ("data", "fsdp") and T over "context", so every per-token part of a
model (projections, MLPs, norms, short convolutions, the loss) is split by XLA's partitioner
on its own. What mixes tokens across shards runs here, once per shard under `shard_map`, with
explicit collectives over "context":

- Causal attention: ring attention (Liu et al. 2023, "Ring Attention with Blockwise
  Transformers for Near-Infinite Context"). A shard keeps its queries while the K/V blocks
  travel round the ring (N - 1 `ppermute`s); the blocks are merged with an online softmax
  (Milakov & Gimelshein 2018), blocks from later shards are skipped, and each block's scores
  are recomputed in the backward instead of stored, so a shard holds O(T/N) activations.
- Sliding-window attention: a halo exchange. A shard receives the last `window` keys and
  values of the previous one (one `ppermute`) and runs `sliding_window_attention` on them
  and its own; needs window <= T / N.
- Matrix memories (linear attention, GLA, DeltaNet, Gated DeltaNet): a shard's state map
  S_in -> A S_in + B is affine, A [Dk, Dk] being the product of its transitions (decays,
  I - beta k k^T). Every column of the state evolves on its own, so one run of the shard's
  chunked recurrence on values [v | 0] from the state [0 | I] gives [B | A]. A and B of all
  shards are gathered, each shard composes those before it into its incoming state (zero
  where a packed document starts at the shard boundary), and a second run from that state
  gives its outputs: exactly the single-device recurrence, at 2 runs of T / N tokens each.
- Deep memories (Titans, ATLAS, the Miras kinds): the state map is not affine, so the shards
  of a sequence run in time order, each handing its final state (weights, momentum, Omega
  window) to the next; a shard's rows are pipelined so that shards overlap (`pipelined`,
  `deep_memory`). A chunk must not straddle a shard boundary (it would change where
  gradients are taken). MAC's whole segment loop (retrieval, attention inside the segment,
  memory update) runs the same way, with whole segments per shard (`models.titans_mac`).

`training.sharding.check_context_parallel` refuses the kinds with no split form (memory
caching) and layouts these parts cannot take.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from layers import attention_math
from pallas_kernels import linear_memory as recurrences
from pallas_kernels.neural_memory import chunked
from pallas_kernels.neural_memory.segments import where_rows

CONTEXT_AXIS = "context"
BATCH_AXES = ("data", "fsdp")


def context_size() -> int:
    """N, the size of the "context" axis of the mesh being traced under (1: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[CONTEXT_AXIS]


def _token_spec(ndim: int) -> PartitionSpec:
    """[B, T, ...] laid out batch over the batch axes, T over "context"."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    return PartitionSpec(batch, CONTEXT_AXIS, *([None] * (ndim - 2)))


def _per_shard(function, arrays: dict, out_ndims: dict, whole: dict | None = None):
    """`function(**local arrays)` on each shard: every array [B, T, ...] split along T, as
    are the outputs (dict name -> ndim) unless their ndim is negative: those come back
    whole, replicated over "context" (the function makes them equal on every shard).
    `whole`: arrays [B, ...] without a T axis, given to every shard entire."""
    whole = {name: x for name, x in (whole or {}).items() if x is not None}
    arrays = {name: x for name, x in arrays.items() if x is not None}
    names = [*arrays, *whole]

    def local(*values):
        return function(**dict(zip(names, values)))

    def out_spec(ndim):
        return _token_spec(ndim) if ndim >= 0 else _whole_spec(-ndim)

    in_specs = (*(_token_spec(x.ndim) for x in arrays.values()),
                *(_whole_spec(x.ndim) for x in whole.values()))  # fmt: skip
    return jax.shard_map(
        local,
        in_specs=in_specs,
        out_specs={name: out_spec(ndim) for name, ndim in out_ndims.items()},
    )(*arrays.values(), *whole.values())


def _whole_spec(ndim: int) -> PartitionSpec:
    """[B, ...] with no T axis: rows over the batch axes, the same on every context shard."""
    return PartitionSpec(_token_spec(2)[0], *([None] * (ndim - 1)))


def _varying(tree):
    """Constants made per-shard values, as `lax.cond` wants both branches' types equal."""
    axes = tuple(jax.sharding.get_abstract_mesh().axis_names)

    def varying(x):
        already = jax.typeof(x).manual_axis_type.varying
        missing = tuple(axis for axis in axes if axis not in already)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(varying, tree)


def _shift_from_previous(x):
    """Shard i receives shard i - 1's x (shard 0 receives the last shard's)."""
    size = context_size()
    return jax.lax.ppermute(x, CONTEXT_AXIS, [(j, (j + 1) % size) for j in range(size)])


# --------------------------------------------------------------------------- attention


def ring_attention(query, key, value, *, segment_ids=None):
    """Causal attention over the whole sequence with T split over "context"; the same
    result as `attention.dot_product_attention` under `attention_mask` (the tests hold it
    to that). query [B, T, H, D], key / value [B, T, K, D] (GQA), segment_ids [B, T]."""
    if segment_ids is None:
        segment_ids = jnp.zeros(query.shape[:2], jnp.int32)
    size = context_size()

    def local(query, key, value, segment_ids):
        shard = jax.lax.axis_index(CONTEXT_AXIS)
        batch, length, num_heads, head_dim = query.shape
        num_kv_heads = key.shape[2]
        grouped = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
        query_index = shard * length + jnp.arange(length)

        @jax.checkpoint  # the backward recomputes a block's scores rather than keeping N
        def merge(stats, key, value, key_segments, source):
            best, total, weighted = stats
            key_index = source * length + jnp.arange(length)
            mask = attention_math.attention_mask(query_index, key_index, query_segments=segment_ids,
                                  key_segments=key_segments)[:, None, None]  # fmt: skip
            scores = jnp.einsum("bqkgd,bskd->bkgqs", grouped, key,
                                preferred_element_type=jnp.float32) * head_dim**-0.5  # fmt: skip
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            new_best = jnp.maximum(best, jnp.max(scores, axis=-1))
            weights = jnp.where(mask, jnp.exp(scores - new_best[..., None]), 0.0)
            rescale = jnp.exp(best - new_best)
            total = rescale * total + jnp.sum(weights, axis=-1)
            block = jnp.einsum("bkgqs,bskd->bkgqd", weights.astype(value.dtype), value,
                               preferred_element_type=jnp.float32)  # fmt: skip
            return new_best, total, rescale[..., None] * weighted + block

        stats_shape = (batch, num_kv_heads, num_heads // num_kv_heads, length)
        stats = _varying((
            jnp.full(stats_shape, jnp.finfo(jnp.float32).min),
            jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, head_dim), jnp.float32),
        ))  # fmt: skip
        block = (key, value, segment_ids)
        for step in range(size):  # step s holds the block of shard (i - s) mod N
            source = (shard - step) % size
            stats = jax.lax.cond(
                source <= shard,  # a later shard's keys are all in the future
                lambda stats, block, source: merge(stats, *block, source),
                lambda stats, block, source: stats,
                stats,
                block,
                source,
            )
            if step < size - 1:
                block = jax.tree.map(_shift_from_previous, block)
        _, total, weighted = stats
        heads = weighted / total[..., None]  # [B, K, G, Tq, D]; a query always sees itself
        heads = jnp.moveaxis(heads, 3, 1).reshape(batch, length, num_heads, head_dim)
        return {"heads": heads.astype(value.dtype)}

    arrays = dict(query=query, key=key, value=value, segment_ids=segment_ids)
    return _per_shard(local, arrays, {"heads": 4})["heads"]


def halo_sliding_window_attention(query, key, value, *, window, segment_ids=None,
                                  prefix_key=None, prefix_value=None):  # fmt: skip
    """`attention.sliding_window_attention` with T split over "context": each shard
    attends over the previous shard's last `window` keys and values and its own (and the
    keys every query sees, prefix_key / prefix_value [B, P, K, D]: Titans' persistent
    memory)."""
    if segment_ids is None:
        segment_ids = jnp.zeros(query.shape[:2], jnp.int32)

    def local(query, key, value, segment_ids, prefix_key=None, prefix_value=None):
        length = query.shape[1]
        if window > length:
            raise ValueError(f"sliding window {window} exceeds a context shard's {length} tokens")
        shard = jax.lax.axis_index(CONTEXT_AXIS)
        halo_key, halo_value, halo_segments = (
            _shift_from_previous(x[:, length - window :]) for x in (key, value, segment_ids)
        )
        # Shard 0's halo is the last shard's tail, not the past: no real token matches -1.
        halo_segments = jnp.where(shard == 0, -1, halo_segments)
        heads = attention_math.sliding_window_attention(
            jnp.concatenate([jnp.zeros_like(query[:, :window]), query], axis=1),
            jnp.concatenate([halo_key, key], axis=1),
            jnp.concatenate([halo_value, value], axis=1),
            window=window,
            segment_ids=jnp.concatenate([halo_segments, segment_ids], axis=1),
            prefix_key=prefix_key,
            prefix_value=prefix_value,
        )
        return {"heads": heads[:, window:]}  # the halo's own queries are not this shard's

    arrays = dict(query=query, key=key, value=value, segment_ids=segment_ids)
    prefix = dict(prefix_key=prefix_key, prefix_value=prefix_value)
    return _per_shard(local, arrays, {"heads": 4}, whole=prefix)["heads"]


# ---------------------------------------------------------------------- matrix memories


def matrix_memory(rule, q, k, v, g=None, beta=None, *, segment_ids=None, chunk_size=64,
                  impl="auto", normalize=False):  # fmt: skip
    """`pallas_kernels.linear_memory.recurrence(rule, ...)` (or `normalized_recurrence`)
    with T split over "context" -> (o [B, T, H, Dv], final state [B, H, Dk, Dv (+ 1 with
    the normaliser: its z column)]), the single-device result."""
    extra_columns = 1 if normalize else 0

    def transition_run(q, k, values, g, beta, initial_state, segment_ids):
        return recurrences.recurrence(
            rule, q, k, values, g, beta, initial_state=initial_state, output_final_state=True,
            segment_ids=segment_ids, chunk_size=min(chunk_size, q.shape[1]), impl=impl,
        )[1]  # fmt: skip

    def output_run(q, k, v, g, beta, initial_state, segment_ids):
        options = dict(initial_state=initial_state, output_final_state=True,
                       segment_ids=segment_ids, chunk_size=min(chunk_size, q.shape[1]),
                       impl=impl)  # fmt: skip
        if normalize:
            return recurrences.normalized_recurrence(rule, q, k, v, g, **options)
        return recurrences.recurrence(rule, q, k, v, g, beta, **options)

    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    size = context_size()

    def local(q, k, v, segment_ids, g=None, beta=None):
        shard = jax.lax.axis_index(CONTEXT_AXIS)
        batch, length, heads, key_dim = k.shape
        width = v.shape[-1] + extra_columns
        values = [v, jnp.ones((batch, length, heads, extra_columns), v.dtype)]
        values.append(jnp.zeros((batch, length, heads, key_dim), v.dtype))
        start = jnp.concatenate(
            [
                jnp.zeros((batch, heads, key_dim, width), jnp.float32),
                jnp.broadcast_to(
                    jnp.eye(key_dim, dtype=jnp.float32), (batch, heads, key_dim, key_dim)
                ),
            ],
            axis=-1,
        )
        values = jnp.concatenate(values, -1)
        final = transition_run(q, k, values, g, beta, _varying(start), segment_ids)
        offsets, transitions = final[..., :width], final[..., width:]  # B, A of this shard
        offsets, transitions = (jax.lax.all_gather(x, CONTEXT_AXIS) for x in (offsets, transitions))
        # The state enters shard j + 1 unless a packed document starts at its first token.
        firsts, lasts = (
            jax.lax.all_gather(x, CONTEXT_AXIS) for x in (segment_ids[:, 0], segment_ids[:, -1])
        )
        state = jnp.zeros_like(offsets[0])
        incoming = state
        for j in range(size - 1):
            keep = (firsts[j + 1] == lasts[j])[:, None, None, None]
            state = jnp.where(keep, transitions[j] @ state + offsets[j], 0.0)
            incoming = jnp.where(shard == j + 1, state, incoming)
        o, final = output_run(q, k, v, g, beta, incoming, segment_ids)
        # The sequence's final state is the last shard's; handed to every shard.
        final = jax.lax.psum(jnp.where(shard == size - 1, final, 0.0), CONTEXT_AXIS)
        return {"o": o, "final": final}

    arrays = dict(q=q, k=k, v=v, segment_ids=segment_ids, g=g, beta=beta)
    out = _per_shard(local, arrays, {"o": 4, "final": -4})
    return out["o"], out["final"]


# ------------------------------------------------------------------------- deep memories


def pipelined(run, tokens, initial, *, segment_ids=None, shared=None):
    """A recurrence over T whose state map is not affine, with T split over "context":
    `run(tokens, state, fresh, segment_ids, shared)` on one row of one shard (tokens: a
    pytree of [1, T / N, ...], state: the row's incoming state, fresh: its initial one,
    which a packed document restarts from; shared: the pytree `shared`, e.g. a module's
    parameters, given to every shard whole -- passed in rather than closed over, as
    `shard_map` cannot differentiate closed-over values that carry a mesh sharding)
    -> (outputs pytree [1, T / N, ...], final state). Returns
    (outputs [B, T, ...], the sequence's final states [B, ...]), the single-device result.

    Shard i can only start a row once shard i - 1 has finished it, so the rows of a shard's
    batch are pipelined: at tick t shard i runs row t - i from the state shard i - 1 handed
    over after running that row at tick t - 1; with b rows per shard every shard is busy for
    b of the b + N - 1 ticks (the bubble: (N - 1) / (b + N - 1)). initial: a pytree of
    [B, ...], the states the rows start from."""
    leaves, tree = jax.tree.flatten(tokens)
    if segment_ids is None:
        segment_ids = jnp.zeros(leaves[0].shape[:2], jnp.int32)
    size = context_size()
    state_leaves, state_tree = jax.tree.flatten(initial)
    shared_leaves, shared_tree = jax.tree.flatten(shared)
    split = (len(leaves), len(leaves) + len(state_leaves))

    def local(segment_ids, *arrays):
        tokens = jax.tree.unflatten(tree, arrays[: split[0]])
        start = jax.tree.unflatten(state_tree, arrays[split[0] : split[1]])
        # Made per-shard values here, not inside the ticks' `lax.cond`: the backward sums
        # their gradients over the shards where they become varying, and a sum inside a
        # branch that only some shards take never completes.
        shared = _varying(jax.tree.unflatten(shared_tree, arrays[split[1] :]))
        shard = jax.lax.axis_index(CONTEXT_AXIS)
        rows = segment_ids.shape[0]
        # A row enters this shard with the previous shard's state unless a packed document
        # starts at its first token (shard 0: every row starts from its initial state).
        lasts = jax.lax.all_gather(segment_ids[:, -1], CONTEXT_AXIS)
        continues = (shard > 0) & (segment_ids[:, 0] == lasts[(shard - 1) % size])

        def row_of(tree, row):
            return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, 0), tree)

        def put(tree, row, new, valid):
            return jax.tree.map(
                lambda x, y: jnp.where(valid, jax.lax.dynamic_update_slice_in_dim(x, y, row, 0), x),
                tree,
                new,
            )

        def run_row(state, fresh, row):
            return run(row_of(tokens, row), state, fresh, row_of(segment_ids, row), shared)

        first = _varying(row_of(start, 0))  # as a received state is
        shapes = jax.eval_shape(run_row, first, first, 0)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # (outputs, state)

        # Recomputed in the backward: kept for every tick, the chunk scans' residuals made
        # the pipeline hold (b + N - 1) rows' worth, more than one device running it all.
        @jax.checkpoint
        def tick(carry, time):
            received, finals = carry
            row = jnp.clip(time - shard, 0, rows - 1)
            valid = (time - shard >= 0) & (time - shard < rows)
            fresh = row_of(start, row)
            state = where_rows(row_of(continues, row), received, fresh)

            def idle(state, fresh, row):  # the pipeline's bubble: this shard waits
                outputs = _varying(zeros[0])
                return outputs, jax.tree.map(lambda x, z: x.astype(z.dtype), state, zeros[1])

            outputs, final = jax.lax.cond(valid, run_row, idle, state, fresh, row)
            finals = put(finals, row, final, valid & (shard == size - 1))
            return (jax.tree.map(_shift_from_previous, final), finals), outputs

        finals = jax.tree.map(lambda x: jnp.zeros((rows, *x.shape[1:]), x.dtype), zeros[1])
        carry = _varying((zeros[1], finals))
        (_, finals), per_tick = jax.lax.scan(tick, carry, jnp.arange(rows + size - 1))
        # Row r ran at tick r + shard: [ticks, 1, L, ...] -> [rows, L, ...].
        outputs = jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, shard, rows, 0)[:, 0], per_tick
        )
        # The sequence's final state is the last shard's; handed to every shard.
        return outputs, jax.tree.map(lambda x: jax.lax.psum(x, CONTEXT_AXIS), finals)

    output_shapes = jax.eval_shape(
        lambda tokens, start: run(tokens, start, start, segment_ids[:1], shared)[0],
        jax.tree.map(lambda x: x[:1], tokens),
        jax.tree.map(lambda x: x[:1], initial),
    )
    in_specs = (_token_spec(2), *(_token_spec(x.ndim) for x in leaves),
                *(_whole_spec(x.ndim) for x in state_leaves),
                *(PartitionSpec() for _ in shared_leaves))  # fmt: skip
    out_specs = (
        jax.tree.map(lambda x: _token_spec(x.ndim), output_shapes),
        jax.tree.unflatten(state_tree, [_whole_spec(x.ndim) for x in state_leaves]),
    )
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs)(
        segment_ids, *leaves, *state_leaves, *shared_leaves
    )


def deep_memory(spec, inputs, initial_state, *, chunk_size, segment_ids=None):
    """`pallas_kernels.neural_memory` (chunked) with T split over "context" -> (o [B, T, H,
    Dv], final state), the single-device result, through `pipelined` (a deep memory's state
    map is not affine). inputs: `MemoryInputs` [B, T, H, ...]; initial_state:
    `NeuralMemoryState` [B, H, ...], also what a packed document restarts from."""

    packed = segment_ids is not None

    def run(tokens, state, fresh, row_segments, shared):
        # Unpacked rows (the pipeline's all-zero ids mark no document start) run without
        # segment ids: the same result, and Memora's lag-token chunk refuses packed rows.
        if not packed:
            return chunked.chunked_scan(spec, tokens, state, chunk_size)
        return chunked.chunked_scan(spec, tokens, state, chunk_size, row_segments,
                                    restart_from=fresh)  # fmt: skip

    return pipelined(run, inputs, initial_state, segment_ids=segment_ids)
