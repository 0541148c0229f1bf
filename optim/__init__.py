"""Memory-efficient optimizers as Optax transformations, and the routing of parameters to them.

    tx = optim.build(config.optim, params, logical_axes, num_steps=config.num_steps)

`params` is the nested dict of parameter arrays, `logical_axes` the same tree of
`PartitionSpec`s of logical axis names; see `optim/routing.py` for which leaf goes where.
"""

from optim.build import build, state_bytes
from optim.config import OPTIMIZER_NAMES, default_config
from optim.routing import param_groups, weight_decay_mask
from optim.schedules import learning_rate_schedule

__all__ = [
    "OPTIMIZER_NAMES",
    "build",
    "default_config",
    "learning_rate_schedule",
    "param_groups",
    "state_bytes",
    "weight_decay_mask",
]
