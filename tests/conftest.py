"""Test-wide setup: 8 fake CPU devices so sharding tests run on one machine.

XLA reads the flag once, when the backend starts, so it is set here before any test
imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
