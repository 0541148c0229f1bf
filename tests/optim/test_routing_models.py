"""Routing on the parameter trees of the real registered models, not a synthetic tree.

Under a matrix optimizer (Muon here) the hidden feature matrices go to it with weight decay;
gate projections (one scalar per head or expert), memories' learned initial states,
persistent tokens, embeddings, norms and convolutions go to AdamW, and gates and initial
states get no weight decay (`optim.routing`'s docstring says why).
"""

import jax
import pytest

import models
from configs import base, mqar
from optim import routing
from training import config_validation
from training.state import model_spec

# Leaf names (the path's last parts) of every gate projection in the registered blocks.
GATE_NAMES = (
    "step_size/kernel", "momentum/kernel", "decay/kernel", "beta/kernel", "omega_gate/kernel",
    "huber_threshold/kernel", "router/kernel", "beta_kernel", "decay_kernel",
)  # fmt: skip
# Hidden feature matrices every kind has at least one of.
MATRIX_NAMES = ("query/kernel", "key/kernel", "value/kernel", "out/kernel", "mlp/up/kernel")


def _routes(kind):
    config = mqar.get_config(kind)
    config.optim.name = "muon"
    config = config_validation.validate(config, base.get_config())
    spec = model_spec(config.model, 0)
    labels = routing.param_groups(config.optim, spec.abstract_params, spec.logical_specs)
    decays = routing.weight_decay_mask(spec.abstract_params, spec.logical_specs)

    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {routing.path_to_str(path): leaf for path, leaf in leaves}

    return flat(labels), flat(decays)


@pytest.mark.parametrize("kind", models.registered_blocks())
def test_gates_and_memory_states_go_to_adamw_without_weight_decay(kind):
    labels, decays = _routes(kind)
    gates = [path for path in labels if path.endswith(GATE_NAMES)]
    states = [path for path in labels if "initial_weights" in path]
    persistent = [path for path in labels if path.endswith("persistent")]
    matrices = [path for path in labels if path.endswith(MATRIX_NAMES)]
    has_gates = kind not in ("attention", "swa", "linear_attention")
    assert bool(gates) == has_gates, sorted(labels)
    assert matrices
    for path in gates + states:
        assert labels[path] == routing.ADAMW_LABEL and not decays[path], path
    for path in persistent:
        assert labels[path] == routing.ADAMW_LABEL, path
    for path in matrices:
        assert labels[path] == "muon" and decays[path], path
    deep_memory = "architecture" in mqar.get_config(kind).model[kind]
    assert bool(states) == deep_memory
