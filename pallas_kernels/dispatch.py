"""Which implementation a recurrence call runs: shared by every recurrence's `api.py`.

    impl "reference" / "chunked"     the XLA paths (token oracle, chunk-parallel)
         "pallas_tpu" / "pallas_gpu" that platform's Pallas kernel, whatever the backend (so
                                     either can be exported, or interpreted, anywhere)
         "pallas"                    the kernel of `jax.default_backend()`; on CPU only with
                                     interpret=True, which then runs the TPU kernel
         "auto"                      a kernel only where the family's `covers` says its tests
                                     reach the call, else "chunked"; never interpreted

A family supplies `rejects(platform) -> reason | None` (what the kernel cannot take at all)
and `covers(platform) -> bool` (what "auto" should send it); `kernel_platform` does the rest.
"""

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "chunked", "pallas", "pallas_tpu", "pallas_gpu")
PALLAS_IMPLS = ("pallas", "pallas_tpu", "pallas_gpu")
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_impl(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def dtype_rejects(dtypes):
    """Why a kernel cannot take these input dtypes (None if it can): float32 / bfloat16."""
    for dtype in dtypes:
        if jnp.dtype(dtype) not in KERNEL_DTYPES:
            return f"dtype {jnp.dtype(dtype)} (kernels take float32 / bfloat16)"
    return None


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


def auto_platform(rejects, covers):
    """The backend's kernel platform when it takes and covers the call, else None."""
    platform = backend_platform()
    if platform is None or rejects(platform) is not None or not covers(platform):
        return None
    return platform


def kernel_platform(impl, interpret, rejects, covers):
    """(platform, interpret): "tpu" / "gpu" when the call runs a Pallas kernel, None for the
    XLA paths, and whether to interpret it ("auto" never does). An explicit Pallas impl the
    kernel cannot take is a ValueError that says why."""
    if impl == "auto":
        return auto_platform(rejects, covers), False
    if impl not in PALLAS_IMPLS:
        return None, False
    platform = forced_kernel_platform(impl, interpret)
    reason = rejects(platform)
    if reason is not None:
        raise ValueError(f"impl={impl!r}: the {platform} kernel does not take {reason}")
    return platform, bool(interpret)
