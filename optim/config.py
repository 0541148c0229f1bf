"""The `optim` config section: its keys, types and defaults.

The config validator rejects keys not listed here and values of another type, so every key
the optimizers read is declared below with a default of the right type.
"""

import ml_collections

OPTIMIZER_NAMES = ("adamw", "muon", "normuon", "apollo", "apollo_mini", "slimadam")


def default_config() -> ml_collections.ConfigDict:
    """Defaults for `config.optim`. Hyper-parameters of each optimizer sit in its sub-section."""
    config = ml_collections.ConfigDict()
    # Optimizer for the matrix parameters (everything else is trained with AdamW).
    config.name = "adamw"  # one of OPTIMIZER_NAMES
    # Peak learning rate and decoupled weight decay of the chosen optimizer.
    config.learning_rate = 3e-3
    config.weight_decay = 0.1
    # Adam moments and epsilon: used by the AdamW group, APOLLO's low-rank Adam and SlimAdam.
    config.b1 = 0.9
    config.b2 = 0.95
    config.eps = 1e-8
    # Schedule: linear warmup to the peak, then "cosine" | "linear" | "constant" down to
    # min_learning_rate_ratio * peak at the last step.
    config.warmup_steps = 100
    config.schedule = "cosine"
    config.min_learning_rate_ratio = 0.1
    # Clip the global gradient norm (over all parameters, before routing); 0 disables.
    config.grad_clip_norm = 1.0
    # The AdamW group when name != "adamw" (embeddings, head, norms, biases, gates, ...):
    # -1 means "same as learning_rate / weight_decay".
    config.adamw_learning_rate = -1.0
    config.adamw_weight_decay = -1.0
    # Regexes searched in the parameter path ("blocks/0/attn/q/kernel"); a match is always
    # trained with AdamW, whatever its shape. (Embeddings and the head need no pattern: their
    # `vocab` axis keeps them off Muon/NorMuon/APOLLO; SlimAdam takes them, see routing.py.)
    config.adamw_patterns = ("conv",)

    # Muon (Jordan et al. 2024, github.com/KellerJordan/Muon).
    config.muon = ml_collections.ConfigDict()
    config.muon.momentum = 0.95  # beta of the momentum buffer
    config.muon.nesterov = True  # reference Nesterov: update = lerp(g, buf, beta)
    config.muon.ns_steps = 5  # quintic Newton-Schulz iterations
    config.muon.ns_dtype = "bfloat16"  # "bfloat16" | "float32": dtype of the iteration
    # "shape": sqrt(max(1, fan_out / fan_in)) (reference); "match_adamw":
    # 0.2 * sqrt(max(fan_in, fan_out)), which matches AdamW's update RMS (Moonlight).
    config.muon.scale = "shape"

    # NorMuon (Li et al. 2025): Muon + per-output-neuron second moment.
    config.normuon = ml_collections.ConfigDict()
    config.normuon.momentum = 0.95
    config.normuon.nesterov = True
    config.normuon.beta2 = 0.95  # EMA of the per-neuron mean squared orthogonal update
    config.normuon.ns_steps = 5
    config.normuon.ns_dtype = "bfloat16"
    config.normuon.scale = "shape"  # as muon.scale

    # APOLLO (Zhu et al. 2025): channel-wise scaling from a random rank-r projection.
    config.apollo = ml_collections.ConfigDict()
    config.apollo.rank = 256  # projection rank r (clamped to the matrix's smaller side)
    config.apollo.update_proj_gap = 200  # steps between fresh random projections
    config.apollo.scale = 1.0  # alpha: the scaled gradient is multiplied by sqrt(alpha)
    config.apollo.norm_growth_limit = 1.01  # gamma: max ratio of update norms step to step
    config.apollo.seed = 0  # seeds the projection PRNG keys (stored, never the matrix)

    # APOLLO-Mini: rank-1 projection, one scaling factor per tensor.
    config.apollo_mini = ml_collections.ConfigDict()
    config.apollo_mini.rank = 1
    config.apollo_mini.update_proj_gap = 200
    # alpha; the update is multiplied by sqrt(alpha) as in the reference implementation.
    config.apollo_mini.scale = 128.0
    config.apollo_mini.norm_growth_limit = 1.01
    config.apollo_mini.seed = 0

    # SlimAdam (Kalra et al. 2025, "When Can You Get Away with Low Memory Adam?"):
    # Adam whose second moment is averaged along chosen axes of each matrix.
    config.slimadam = ml_collections.ConfigDict()
    # "paper": the paper's per-role rules (q/k, v/o, MLP, embedding, head); "none": keep
    # the full second moment (plain AdamW), useful as a control; "snr": measure, before
    # training, the signal-to-noise ratio of Adam's second moment over `calibration_steps`
    # gradient batches and compress along the axes where it is high
    # (`optim.slimadam.calibrate_axes`, run by `training.calibration`).
    config.slimadam.rules = "paper"
    # SNR threshold of `calibrate_axes`: compress along K only if SNR_K(v) > snr_cutoff.
    config.slimadam.snr_cutoff = 1.0
    config.slimadam.calibration_steps = 20
    return config
