"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

Every optimizer group (the matrix optimizer and the AdamW group) follows the same shape of
schedule, scaled to its own peak learning rate, so one config section describes both.
"""

import ml_collections
import optax

from errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(
    optim_config: ml_collections.ConfigDict,
    num_steps: int,
    *,
    peak_learning_rate: float | None = None,
) -> optax.Schedule:
    """Linear warmup to the peak over `warmup_steps`, then decay to the floor.

    The warmup starts at peak / warmup_steps, not 0: at 0 the first update would be wasted
    (and a skipped non-finite update, which does not advance the optimizer's count, would
    waste the next one too).

    The floor is `min_learning_rate_ratio * peak`; it is reached at `num_steps` ("cosine",
    "linear") or never left ("constant" stays at the peak). `peak_learning_rate` defaults
    to `optim_config.learning_rate`; the AdamW group of a mixed optimizer passes its own.
    """
    peak = optim_config.learning_rate if peak_learning_rate is None else peak_learning_rate
    warmup_steps = int(optim_config.warmup_steps)
    if num_steps <= 0:
        raise ConfigError(f"num_steps must be positive to build a schedule, got {num_steps}")
    if warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= optim_config.min_learning_rate_ratio <= 1.0:
        raise ConfigError(
            "optim.min_learning_rate_ratio must lie in [0, 1], got "
            f"{optim_config.min_learning_rate_ratio}"
        )
    # A warmup longer than the run would never reach the peak: clamp it to the run.
    warmup_steps = min(warmup_steps, num_steps)
    floor = peak * optim_config.min_learning_rate_ratio
    decay_steps = max(num_steps - warmup_steps, 1)

    name = optim_config.schedule
    if name == "cosine":
        decay = optax.cosine_decay_schedule(
            init_value=peak, decay_steps=decay_steps, alpha=optim_config.min_learning_rate_ratio
        )
    elif name == "linear":
        decay = optax.linear_schedule(
            init_value=peak, end_value=floor, transition_steps=decay_steps
        )
    elif name == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {name!r}")

    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(
        init_value=peak / warmup_steps, end_value=peak, transition_steps=warmup_steps - 1
    )
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])
