"""The device mesh and how parameters and batches are laid out on it.

A `Mesh` with axes ("data", "fsdp"). Batches are split over both axes (every device holds
a distinct slice of the global batch). Parameters are split according to their logical
axis names and the rules table `config.mesh.rules`; with `mesh.fsdp = 1` every parameter
is replicated and training is pure data parallel.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """Resolve `mesh.data` / `mesh.fsdp` (one of them may be -1) against the device count."""
    sizes = {"data": mesh_config.data, "fsdp": mesh_config.fsdp}
    unknown = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}: must be a positive size or -1, got {size}")
    if len(unknown) > 1:
        raise ConfigError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh.{unknown[0]}: -1 cannot fill {num_devices} devices "
                f"when the other axis has size {known}"
            )
        sizes[unknown[0]] = num_devices // known
    total = sizes["data"] * sizes["fsdp"]
    if total > num_devices:
        raise ConfigError(
            f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} needs {total} devices, "
            f"only {num_devices} available"
        )
    if total != num_devices:
        raise ConfigError(
            f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} = {total} devices, but "
            f"{num_devices} are available; use -1 to fill"
        )
    return sizes["data"], sizes["fsdp"]


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Join each process's slice of the batch into one global array per key."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
