"""The tail-end study's model and its premise (Wang et al. 2025, §5): from W_0 = 0 with
orthonormal embeddings, one gradient step raises each class's margin in proportion to its
frequency, while one Muon step (the gradient's orthogonal factor) raises every class's
margin about equally. Then a short run of the command line writes its results."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import tail_end_memory as study
from optim.muon import muon

K = D = 64


def one_step_margins(optimizer):
    """Each class's margin (correct logit minus the mean logit) after one step on the
    expected loss Σ_k p_k CE_k from W_0 = 0."""
    p = jnp.asarray(study.class_probabilities(K, 1.0), jnp.float32)
    keys, values = study.embeddings("orthonormal", D, K, seed=0)

    def expected_loss(params):
        logits = study.class_logits(params["W"], keys, values)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(K))
        return jnp.sum(p * ce)

    params = {"W": jnp.zeros((D, D), jnp.float32)}
    grads = jax.grad(expected_loss)(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    logits = np.asarray(study.class_logits(updates["W"], keys, values))
    return np.diagonal(logits) - logits.mean(axis=1), np.asarray(p)


def test_one_muon_step_learns_every_class_alike_and_gradient_descent_does_not():
    gd, p = one_step_margins(optax.sgd(1.0))
    # Gradient descent: margin gains in proportion to p_k (the centering term aside).
    np.testing.assert_allclose(gd / gd[0], p / p[0], rtol=0.05)
    assert gd.max() / gd.min() > 0.9 * p.max() / p.min()  # 64x between head and tail
    orthogonal, _ = one_step_margins(muon(1.0, momentum=0.0, nesterov=False, ns_dtype="float32"))
    assert np.all(orthogonal > 0)
    assert orthogonal.max() / orthogonal.min() < 3.0  # Newton-Schulz: singular values ~0.7-1.2


def test_the_command_line_writes_every_optimizer(tmp_path):
    results = study.main(
        ["--steps=20", "--classes=16", "--dim=16", "--batch_size=32", "--evals=4",
         "--learning_rates=0.01,0.1", f"--out={tmp_path}"]
    )  # fmt: skip
    saved = json.loads((tmp_path / "tail_end_memory.json").read_text())
    assert set(saved["optimizers"]) == set(study.OPTIMIZERS) == set(results["optimizers"])
    assert saved["steps"] == [5, 10, 15, 20]
    for result in saved["optimizers"].values():
        assert result["best_learning_rate"] in (0.01, 0.1)
        curves = result["sweep"][0]["curves"]
        assert all(len(values) == 4 for values in curves.values())
    assert (tmp_path / "tail_end_memory.png").stat().st_size > 0
    assert "| muon |" in (tmp_path / "tail_end_memory.md").read_text()
