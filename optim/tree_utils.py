"""Small pytree helpers shared by the optimizers."""

import jax


def map_unzip(fn, tree, *rest, num_outputs: int):
    """`jax.tree.map` for a `fn` returning a tuple: one output tree per tuple element.

    Works on the masked trees `optax.partition` passes in (its empty `MaskedNode`s are kept),
    which a map with an `is_leaf=tuple` test would mistake for results.
    """
    leaves, treedef = jax.tree.flatten(tree)
    other_leaves = [treedef.flatten_up_to(other) for other in rest]
    results = [fn(*args) for args in zip(leaves, *other_leaves)]
    return tuple(treedef.unflatten([result[i] for result in results]) for i in range(num_outputs))
