"""Which Pallas kernel platform a call runs on: shared by every recurrence's `api.py`."""

import jax


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def backend_platform():
    """The kernel platform of the default backend: "tpu", "gpu", or None (CPU, others)."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    return None


def forced_kernel_platform(impl: str, interpret: bool) -> str:
    """Platform of the kernel an explicit impl="pallas" / "pallas_tpu" / "pallas_gpu" asks
    for; plain "pallas" follows the backend, and on CPU needs interpret=True (then "tpu")."""
    if impl in ("pallas_tpu", "pallas_gpu"):
        return impl.removeprefix("pallas_")
    platform = backend_platform()
    if platform is None:
        if not interpret:
            raise ValueError(
                f"impl='pallas' on backend {jax.default_backend()!r}: no Pallas kernel; "
                "pass interpret=True, or use impl='chunked'"
            )
        platform = "tpu"
    return platform
