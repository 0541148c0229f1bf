"""Grain input pipelines: byte-level text, pre-tokenized token files, and synthetic MQAR.

The training loop uses exactly this interface:
`default_config()` (the `data` config section), `validate(data_config)`,
`vocab_size(data_config)`, `build_train_iterator(...)` (a checkpointable, process-sharded
grain iterator) and `build_eval_batches(...)` (a fixed list of held-out batches).
"""

from data.config import default_config, validate, vocab_size
from data.pipeline import build_eval_batches, build_train_iterator

__all__ = [
    "build_eval_batches",
    "build_train_iterator",
    "default_config",
    "validate",
    "vocab_size",
]
