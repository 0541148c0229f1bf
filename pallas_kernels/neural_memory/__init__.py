"""Deep (Titans / Miras) memory recurrence: a small per-head network trained online on k -> v.

`neural_memory` (api.py) is the public function; `choices.py` holds the four Miras choices
(with `choices_architecture.py`, and `choices_miras.py` for Moneta / Yaad / Memora / ATLAS),
`memory_inputs.py` the per-token input record every form takes, `reference.py` the
token-by-token oracles, `chunked.py` the chunk-parallel form (`chunked_gradients.py`, and
`chunked_materialised.py` for the non-linear choices).
"""

from pallas_kernels.neural_memory.api import init_state, neural_memory, read, state_norms, step
from pallas_kernels.neural_memory.choices import MemorySpec, NeuralMemoryState
from pallas_kernels.neural_memory.memory_inputs import MemoryInputs, TokenInput

__all__ = [
    "MemoryInputs",
    "MemorySpec",
    "NeuralMemoryState",
    "init_state",
    "neural_memory",
    "read",
    "state_norms",
    "step",
    "TokenInput",
]
