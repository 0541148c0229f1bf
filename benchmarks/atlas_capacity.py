"""Memory-level capacity of ATLAS's feature maps (ATLAS §3.1: a matrix memory over φ_p(k)
stores O(d_k^p) linearly independent pairs, over k itself O(d_k)).

N random unit keys k_j in d dimensions and random unit values v_j are written into one
memory (`pallas_kernels.neural_memory`, the exact token rule, l2 bias, plain GD, no
forgetting), passing over the N pairs `passes` times in a fixed shuffled order, with
θ = 1 / ‖φ(k)‖^2 (the normalised delta rule, i.e. Kaczmarz: it converges to an exact
interpolant whenever one exists). Then every key is read back: recall is the fraction of
keys whose read M(φ(k_j)) is nearest (cosine) to its own v_j among the N values, and the
error is the mean ‖M(φ(k_j)) - v_j‖ / ‖v_j‖. The feature maps are the layer's own at
initialisation (`layers.feature_maps`), after the ℓ2 normalisation as in `NeuralMemory`.

    python -m benchmarks.atlas_capacity            # writes benchmarks/results/atlas_capacity.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from layers.feature_maps import feature_dim, make_feature_map
from layers.norms import l2_normalize
from pallas_kernels.neural_memory import MemoryInputs, MemorySpec, api, neural_memory

MAPS = (("identity", 1), ("polynomial", 2), ("monomial", 2))


def capacity_point(architecture, feature_map, degree, dim, num_pairs, passes, seed):
    """(recall, mean relative error) after writing num_pairs pairs (module docstring)."""
    keys_rng, values_rng, order_rng, init_rng = jax.random.split(jax.random.key(seed), 4)
    keys = l2_normalize(jax.random.normal(keys_rng, (1, num_pairs, 1, dim)))
    values = l2_normalize(jax.random.normal(values_rng, (1, num_pairs, 1, dim)))
    module = make_feature_map(feature_map, 1, degree)
    features = keys if module is None else module(keys)
    key_dim = feature_dim(feature_map, dim, degree)
    spec = MemorySpec(architecture=architecture, rule="gd")
    shapes = spec.weight_shapes(key_dim, dim)
    if architecture == "matrix":  # an empty memory: what it recalls, it was written
        initial = {name: jnp.zeros((1,) + shape) for name, shape in shapes.items()}
    else:
        rngs = jax.random.split(init_rng, len(shapes))
        initial = {
            name: jax.random.normal(rng, (1,) + shape) * shape[0] ** -0.5
            for rng, (name, shape) in zip(rngs, shapes.items())
        }
    order = jnp.concatenate(
        [jax.random.permutation(key, num_pairs) for key in jax.random.split(order_rng, passes)]
    )
    k, v = features[:, order], values[:, order]
    lr = 1.0 / jnp.sum(k * k, axis=-1)  # [1, T, 1]
    inputs = MemoryInputs(q=k, k=k, v=v, lr=lr)
    state = api.init_state(spec, initial, 1)
    _, final = neural_memory(
        inputs, memory=spec, initial_state=state, chunk_size=1, impl="reference",
        output_final_state=True,
    )  # fmt: skip
    read = api.read(spec, final, features)[0, :, 0]  # [N, d]
    target = values[0, :, 0]
    cosine = l2_normalize(read) @ target.T
    recall = float(jnp.mean(jnp.argmax(cosine, axis=-1) == jnp.arange(num_pairs)))
    error = float(jnp.mean(jnp.linalg.norm(read - target, axis=-1)))
    return recall, error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--architectures", nargs="+", default=["matrix", "mlp"])
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/atlas_capacity.json")
    args = parser.parse_args()
    rows = []
    for architecture in args.architectures:
        for dim in args.dims:
            for feature_map, degree in MAPS:
                for num_pairs in args.pairs:
                    start = time.perf_counter()
                    points = [
                        capacity_point(
                            architecture, feature_map, degree, dim, num_pairs, args.passes, seed
                        )
                        for seed in range(args.seeds)
                    ]
                    recall, error = np.mean(points, axis=0)
                    row = dict(
                        architecture=architecture, feature_map=feature_map, degree=degree,
                        dim=dim, key_dim=feature_dim(feature_map, dim, degree),
                        num_pairs=num_pairs, recall=float(recall), error=float(error),
                        seconds=time.perf_counter() - start,
                    )  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    with open(args.out, "w") as file:
        json.dump({"passes": args.passes, "seeds": args.seeds, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
