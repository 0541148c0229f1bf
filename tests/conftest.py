"""Test-wide setup: 8 fake CPU devices so sharding tests run on one machine.

XLA reads the flag once, when the backend starts, so it is set here before any test
imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Vector extensions that change XLA's float32 CPU code (and so its rounding): a failure
# report that names them says which kind of machine it came from.
_VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")


def _cpu_description() -> str:
    """The first processor's model name and the vector extensions it has (Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    model = fields.get("model name", "unknown CPU")
    flags = set(fields.get("flags", "").split())
    vector = [flag for flag in _VECTOR_FLAGS if flag in flags] or [
        "none of " + "/".join(_VECTOR_FLAGS)
    ]
    return f"{model}; vector extensions: {', '.join(vector)}"


def pytest_report_header(config):
    del config
    return f"cpu: {_cpu_description()}"


def pytest_terminal_summary(terminalreporter):
    """The same line at the end of the run: `make test` runs pytest -q, which hides the
    header, and the summary is what a failure report quotes."""
    terminalreporter.write_line(f"cpu: {_cpu_description()}")
