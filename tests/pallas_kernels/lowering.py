"""Lowering Pallas kernels for an accelerator this CPU machine does not have.

TPU kernels lower with `jax.export(..., platforms=["tpu"])` alone. Triton (GPU) kernels
need the target GPU's compute capability: jax 0.10 lowers for a default one, jax 0.12
refuses with "No supported GPU devices found" unless an abstract mesh names an abstract
GPU device. `lowering_target("gpu")` names the one this project's device checks run on
(an H200, compute capability 9.0), on every jax version.
"""

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

ABSTRACT_GPU = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")


@contextlib.contextmanager
def lowering_target(platform: str):
    """Context in which `jax.export` lowers Pallas kernels for `platform` ("tpu" | "gpu")."""
    if platform == "tpu":
        yield
        return
    # Auto, not the default Explicit axis: explicit sharding would type every array by the
    # one-device mesh, which some kernels' wrappers (reshapes of scalars) do not survive.
    mesh = AbstractMesh((1,), ("gpu",), (AxisType.Auto,), abstract_device=ABSTRACT_GPU)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
