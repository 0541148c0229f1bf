"""The device mesh and how parameters and batches are laid out on it.

A `Mesh` with axes ("data", "fsdp", "context"). Batches are split over "data" and "fsdp"
(every device group holds a distinct slice of the global batch) and, along T, over
"context" (`layers.context_parallel`: each sequence split across devices). Parameters are
split according to their logical axis names and the rules table `config.mesh.rules`; with
`mesh.fsdp = 1` every parameter is replicated and training is pure data parallel.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from errors import ConfigError
from layers.context_parallel import BATCH_AXES, CONTEXT_AXIS

MESH_AXES = (*BATCH_AXES, CONTEXT_AXIS)

# Block kinds whose token mixing `layers.context_parallel` splits along T, and why the rest
# cannot be split yet.
DEEP_MEMORY_KINDS = ("lmm", "mal", "mag", "atlas", "omeganet", "moneta", "yaad", "memora")
CONTEXT_PARALLEL_KINDS = (
    *("attention", "swa"),  # ring attention, halo exchange
    *("linear_attention", "gla", "deltanet", "gdn", "mom"),  # affine state composition
    *DEEP_MEMORY_KINDS,  # pipelined over a shard's rows
    "mac",  # its segments pipelined too, whole segments per shard
)
NOT_SPLIT = {
    "gdn_mc": "memory caching's reads of the cached segment states have no split form yet",
    "lmm_mc": "memory caching's reads of the cached segment states have no split form yet",
}
NOT_SPLIT_DEFAULT = "it has no split form yet"
# Kinds that run in fixed windows of the row: a shard must hold whole ones.
SEGMENT_KEYS = {"mac": "segment_size"}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolve `mesh.data` / `mesh.fsdp` / `mesh.context` (one may be -1) against the
    device count."""
    sizes = {axis: mesh_config.get(axis, 1) for axis in MESH_AXES}
    unknown = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}: must be a positive size or -1, got {size}")
    if len(unknown) > 1:
        raise ConfigError(f"mesh: at most one of {', '.join('mesh.' + a for a in MESH_AXES)} "
                          "may be -1")  # fmt: skip
    known = math.prod(size for size in sizes.values() if size != -1)
    described = " x ".join(f"{name}={size}" for name, size in sizes.items() if size != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh.{unknown[0]}: -1 cannot fill {num_devices} devices "
                f"when the other axes are {described}"
            )
        sizes[unknown[0]] = num_devices // known
    total = math.prod(sizes.values())
    described = " x ".join(f"{name}={size}" for name, size in sizes.items())
    if total > num_devices:
        raise ConfigError(f"mesh: {described} needs {total} devices, only {num_devices} available")
    if total != num_devices:
        raise ConfigError(
            f"mesh: {described} = {total} devices, but {num_devices} are available; use -1 to fill"
        )
    return tuple(sizes[axis] for axis in MESH_AXES)


def check_context_parallel(config, context: int) -> None:
    """ConfigError unless every block kind can be split along T into `context` shards."""
    if context == 1:
        return
    seq_len = config.data.seq_len
    if seq_len % context:
        raise ConfigError(f"mesh.context={context}: data.seq_len={seq_len} is not divisible "
                          "by it")  # fmt: skip
    shard = seq_len // context
    for kind in dict.fromkeys(config.model.block_pattern):
        if kind not in CONTEXT_PARALLEL_KINDS:
            why = NOT_SPLIT.get(kind, NOT_SPLIT_DEFAULT)
            raise ConfigError(f"mesh.context={context}: block kind {kind!r} cannot be split "
                              f"along the sequence: {why}")  # fmt: skip
        chunk = config.model[kind].get("chunk_size", 1) if kind in config.model else 1
        if kind in DEEP_MEMORY_KINDS and shard % chunk:
            # The chunked deep memory takes each gradient at its chunk's start: chunks that
            # straddle a shard boundary would change what it computes.
            raise ConfigError(
                f"mesh.context={context}: model.{kind}.chunk_size={chunk} does not divide a "
                f"shard's {shard} tokens (data.seq_len / mesh.context)"
            )
        segment_key = SEGMENT_KEYS.get(kind)
        if segment_key and shard % config.model[kind][segment_key]:
            raise ConfigError(
                f"mesh.context={context}: model.{kind}.{segment_key}="
                f"{config.model[kind][segment_key]} does not divide a shard's {shard} tokens "
                "(data.seq_len / mesh.context)"
            )
        window = config.model[kind].get("window", 0) if kind in config.model else 0
        if window > shard:  # the halo exchange reaches one shard back
            raise ConfigError(
                f"mesh.context={context}: model.{kind}.window={window} exceeds a shard's "
                f"{shard} tokens (data.seq_len / mesh.context)"
            )


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    # Auto axes: jit propagates shardings (GSPMD); model code needs no sharding types.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_mesh_spec(logical: PartitionSpec, rules, shape=None, mesh=None) -> PartitionSpec:
    """Map logical axis names to mesh axes through `rules` (missing or "" -> replicated).

    A dimension is only sharded if its size divides by the mesh axis size (so tiny
    parameters such as a 4-wide conv stay replicated instead of failing), and a mesh axis is
    used at most once per parameter.
    """
    used = set()
    mesh_axes = []
    for dim, name in enumerate(logical):
        axis = rules.get(name, "") if isinstance(name, str) else ""
        fits = (
            shape is None
            or mesh is None
            or (axis and shape[dim] % mesh.shape[axis] == 0 and mesh.shape[axis] > 1)
        )
        if axis and axis not in used and fits:
            mesh_axes.append(axis)
            used.add(axis)
        else:
            mesh_axes.append(None)
    return PartitionSpec(*mesh_axes)


def param_shardings(params, logical_specs, mesh: Mesh, rules):
    """NamedShardings for a parameter tree from its logical specs."""
    rules = dict(rules)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, logical_to_mesh_spec(spec, rules, x.shape, mesh)),
        params,
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def under_mesh(mesh: Mesh, function):
    """`function` called (so traced) under `jax.set_mesh(mesh)` when the mesh splits T
    ("context" > 1): `layers.context_parallel` reads the axis from there. Otherwise
    `function` itself."""
    if mesh.shape[CONTEXT_AXIS] == 1:
        return function

    def called_under_mesh(*args, **kwargs):
        with jax.set_mesh(mesh):
            return function(*args, **kwargs)

    return called_under_mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, T]: rows over the batch axes, T over "context"."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, CONTEXT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Join each process's slice of the batch into one global array per key."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
