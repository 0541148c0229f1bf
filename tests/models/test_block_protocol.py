"""Every registered block kind honours the block protocol of `models.registry`: the forward,
decoding (init_cache / extend) and the probe contract (memory_writes -> a record of
`layers.memory_writes`), so the evals can trace any kind without naming its class."""

import jax.numpy as jnp
import pytest
from flax import nnx

from configs import base
from layers.memory_writes import DeepMemoryWrites, MatrixMemoryWrites, NoMemory
from models import registry

BATCH, LENGTH, WIDTH = 2, 8, 16
# What each family's memory writes; the attention kinds train no memory in the forward pass.
MATRIX_KINDS = ("linear_attention", "gla", "deltanet", "gdn", "mom", "gdn_mc")
NO_MEMORY_KINDS = ("attention", "swa")


def _block(kind):
    config = base.get_config().model
    config.vocab_size, config.d_model, config.num_heads, config.num_layers = 32, WIDTH, 2, 1
    return registry.build_block(kind, config, layer_index=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", registry.registered_blocks())
def test_every_block_answers_the_protocol(kind):
    block = _block(kind)
    for method in ("__call__", "init_cache", "extend", "memory_writes"):
        assert callable(getattr(block, method, None)), f"{kind} has no {method}"
    x = jnp.ones((BATCH, LENGTH, WIDTH), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    # Shapes only (no compilation): the record's type and its per-token layout.
    writes = nnx.eval_shape(lambda block, x: block.memory_writes(x, positions=positions), block, x)
    if kind in NO_MEMORY_KINDS:
        assert isinstance(writes, NoMemory) and writes.reason
    elif kind in MATRIX_KINDS:
        assert isinstance(writes, MatrixMemoryWrites)
        assert writes.q.shape[:2] == (BATCH, LENGTH) and writes.v.shape[:2] == (BATCH, LENGTH)
    else:
        assert isinstance(writes, DeepMemoryWrites)
        shapes = [x.shape[:2] for x in writes.inputs.named().values()]
        assert shapes and all(b == BATCH and t >= LENGTH for b, t in shapes)
