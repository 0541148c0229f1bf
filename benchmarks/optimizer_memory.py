"""Optimizer-state memory of every `optim` optimizer on a Transformer LM's parameter shapes.

    python -m benchmarks.optimizer_memory --d_model=2048 --num_layers=24 --vocab_size=32000

Nothing is allocated: states come from `jax.eval_shape(tx.init, abstract_params)` and are
counted with `optim.state_bytes`. Next to the measurement, the closed form per routed matrix
`[fan_in=m, fan_out=n]` (float32, 4 bytes an entry); the AdamW group (embedding, head, norms)
costs 2 entries per parameter in every row:

    AdamW        2mn          NorMuon      mn + n            APOLLO-Mini  2 max(m, n)
    Muon         mn           APOLLO       2 r max(m, n)     SlimAdam     mn + |v compressed|

"extra" is what the closed forms leave out: step counters, APOLLO's PRNG keys and limiter norms.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import optim
from optim import routing, slimadam

BYTES = 4  # float32 states


def lm_shapes(d_model: int, num_layers: int, mlp_dim: int, vocab_size: int):
    """(abstract params, logical axes) of a Llama-style LM, named like `models/lm.py`."""
    block = {
        "attention_norm": {"scale": ((d_model,), P("norm"))},
        "attention": {
            name: {"kernel": ((d_model, d_model), P("embed", "qkv"))}
            for name in ("query", "key", "value")
        }
        | {"out": {"kernel": ((d_model, d_model), P("qkv", "embed"))}},
        "mlp_norm": {"scale": ((d_model,), P("norm"))},
        "mlp": {
            "gate": {"kernel": ((d_model, mlp_dim), P("embed", "mlp"))},
            "up": {"kernel": ((d_model, mlp_dim), P("embed", "mlp"))},
            "down": {"kernel": ((mlp_dim, d_model), P("mlp", "embed"))},
        },
    }
    tree = {
        "embedding": {"embedding": ((vocab_size, d_model), P("vocab", "embed"))},
        "blocks": dict.fromkeys(range(num_layers), block),
        "final_norm": {"scale": ((d_model,), P("norm"))},
        "lm_head": {"kernel": ((d_model, vocab_size), P("embed", "vocab"))},
    }
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)  # noqa: E731
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x[0], jnp.float32), tree, is_leaf=is_pair)
    axes = jax.tree.map(lambda x: x[1], tree, is_leaf=is_pair)
    return params, axes


def closed_form_bytes(name: str, config, params, axes) -> int:
    """State bytes predicted by the formulas of the module docstring (no counters/keys)."""
    labels = jax.tree_util.tree_flatten_with_path(optim.param_groups(config, params, axes))[0]
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {routing.path_to_str(p): leaf.shape for p, leaf in flat_params}
    slim_axes = slimadam.axes_from_rules(params, axes, config.slimadam.rules)
    total = 0
    for path, label in labels:
        path = routing.path_to_str(path)
        shape = shapes[path]
        size = int(np.prod(shape))
        if label == "adamw":
            total += 2 * size
            continue
        m, n = shape[-2], shape[-1]
        stack = size // (m * n)
        if name == "muon":
            total += size
        elif name == "normuon":
            total += size + stack * n
        elif name in ("apollo", "apollo_mini"):
            rank = min(config[name].rank, m, n)
            total += stack * 2 * rank * max(m, n)
        elif name == "slimadam":
            axes_here = slim_axes[path] or ()
            compressed = size // int(np.prod([shape[a] for a in axes_here], dtype=np.int64))
            total += size + compressed
    return total * BYTES


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--num_layers", type=int, default=12)
    parser.add_argument("--mlp_dim", type=int, default=0, help="0: 8/3 d_model, rounded to 64")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--apollo_rank", type=int, default=256)
    args = parser.parse_args()
    mlp_dim = args.mlp_dim or 64 * round(8 * args.d_model / 3 / 64)
    params, axes = lm_shapes(args.d_model, args.num_layers, mlp_dim, args.vocab_size)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(
        f"LM d_model={args.d_model} layers={args.num_layers} mlp={mlp_dim} "
        f"vocab={args.vocab_size}: {num_params / 1e6:.1f}M parameters, "
        f"{num_params * BYTES / 2**20:.0f} MiB in float32"
    )
    header = f"{'optimizer':<12} {'state MiB':>10} {'vs AdamW':>9} {'closed form MiB':>16}"
    print(f"{header} {'extra B':>8}")
    adamw_bytes = None
    for name in optim.OPTIMIZER_NAMES:
        config = optim.default_config()
        config.name = name
        config.apollo.rank = args.apollo_rank
        tx = optim.build(config, params, axes, num_steps=1000)
        measured = optim.state_bytes(jax.eval_shape(tx.init, params))
        adamw_bytes = adamw_bytes or measured
        if name == "adamw":
            predicted = 2 * num_params * BYTES
        else:
            predicted = closed_form_bytes(name, config, params, axes)
        print(
            f"{name:<12} {measured / 2**20:>10.1f} {measured / adamw_bytes:>9.3f} "
            f"{predicted / 2**20:>16.1f} {measured - predicted:>8d}"
        )


if __name__ == "__main__":
    main()
