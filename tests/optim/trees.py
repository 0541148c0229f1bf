"""Small parameter trees shaped like a Transformer LM with a memory layer, for optim tests.

Names and logical axes follow `models/lm.py`, `layers/attention.py`, `layers/mlp.py` and
`layers/short_conv.py` (embedding, attention/query..out, mlp/gate..down, *_norm/scale).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

VOCAB, EMBED, MLP, HEADS, DK, DV = 32, 16, 24, 2, 8, 4


def lm_params_and_axes(seed: int = 0):
    """(params, logical_axes): nested dicts as `nnx.to_pure_dict` gives them (int list keys)."""
    shapes_and_axes = {
        "embedding": {"embedding": ((VOCAB, EMBED), P("vocab", "embed"))},
        "blocks": {
            0: {
                "attention_norm": {"scale": ((EMBED,), P("norm"))},
                "attention": {
                    "query": {"kernel": ((EMBED, EMBED), P("embed", "qkv"))},
                    "key": {"kernel": ((EMBED, EMBED), P("embed", "qkv"))},
                    "value": {"kernel": ((EMBED, EMBED), P("embed", "qkv"))},
                    "out": {"kernel": ((EMBED, EMBED), P("qkv", "embed"))},
                },
                "mlp_norm": {"scale": ((EMBED,), P("norm"))},
                "mlp": {
                    "gate": {"kernel": ((EMBED, MLP), P("embed", "mlp"))},
                    "up": {"kernel": ((EMBED, MLP), P("embed", "mlp")), "bias": ((MLP,), P())},
                    "down": {"kernel": ((MLP, EMBED), P("mlp", "embed"))},
                },
            },
            1: {
                "memory": {
                    "w1": {"kernel": ((HEADS, DK, DV), P("heads", "kv", "mlp"))},
                    "gate": ((HEADS,), P("heads")),
                    "lr_scalar": ((), P()),
                    "short_conv": {"kernel": ((4, EMBED), P("conv", "qkv"))},
                    "feature_mix": {"kernel": ((EMBED, EMBED), P(None, None))},
                },
            },
        },
        "final_norm": {"scale": ((EMBED,), P("norm"))},
        "lm_head": {"kernel": ((EMBED, VOCAB), P("embed", "vocab"))},
    }
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)  # noqa: E731
    leaves, treedef = jax.tree.flatten(shapes_and_axes, is_leaf=is_pair)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = treedef.unflatten(
        [0.1 * jax.random.normal(k, shape, jnp.float32) for k, (shape, _) in zip(keys, leaves)]
    )
    axes = treedef.unflatten([spec for _, spec in leaves])
    return params, axes


# Leaves the matrix optimizers (Muon, NorMuon, APOLLO) get with the default config.
MATRIX_LEAVES = {
    "blocks/0/attention/query/kernel",
    "blocks/0/attention/key/kernel",
    "blocks/0/attention/value/kernel",
    "blocks/0/attention/out/kernel",
    "blocks/0/mlp/gate/kernel",
    "blocks/0/mlp/up/kernel",
    "blocks/0/mlp/down/kernel",
    "blocks/1/memory/w1/kernel",
    "blocks/1/memory/feature_mix/kernel",
}
