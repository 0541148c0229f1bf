"""Deep (Titans / Miras) memory recurrence: a small per-head network trained online on k -> v.

`neural_memory` (api.py) is the public function; `choices.py` holds the four Miras choices,
`reference.py` the token-by-token oracles, `chunked.py` the chunk-parallel form.
"""

from pallas_kernels.neural_memory.api import init_state, neural_memory, state_norms, step
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState

__all__ = [
    "MemorySpec",
    "NeuralMemoryState",
    "init_state",
    "neural_memory",
    "state_norms",
    "step",
]
