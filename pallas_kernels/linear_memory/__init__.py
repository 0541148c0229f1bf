"""Matrix-memory recurrences (linear attention, simple GLA, DeltaNet, Gated DeltaNet).

See `api.py` for conventions; `reference.py` is the oracle, `chunked.py` the XLA version.
"""

from pallas_kernels.linear_memory.api import (
    RULES,
    delta_rule,
    gated_delta_rule,
    linear_attention,
    normalized_recurrence,
    recurrence,
    simple_gla,
)

__all__ = [
    "RULES",
    "delta_rule",
    "gated_delta_rule",
    "linear_attention",
    "normalized_recurrence",
    "recurrence",
    "simple_gla",
]
