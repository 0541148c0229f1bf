"""The full config schema with defaults: every experiment starts from `base.get_config()`.

Each section belongs to one package, which defines its own keys (`models.default_config`,
`data.default_config`, `optim.default_config`); the training sections are defined here.
The validator (`training.config_validation`) treats this tree as the schema: a key that is
not here is a typo, and a value whose type differs from the default is rejected.
"""

import ml_collections

import data
import models
import optim


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = models.default_config()
    config.model.vocab_size = 0  # 0: the data's vocabulary (resolved before validation)
    config.data = data.default_config()
    config.optim = optim.default_config()

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1000
    config.train.batch_size = 16  # global, across all processes and devices
    config.train.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
    # What a NaN/Inf loss or gradient does: "stop" (exit 1, naming the step) or "skip" the
    # update and count it. Either way a non-finite update never reaches the parameters.
    config.train.nonfinite = "stop"
    # Fault injection for tests of that policy: the loss at this step is NaN (-1: never).
    config.train.inject_nonfinite_at_step = -1

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices left over by the other axis
    config.mesh.fsdp = 1
    # Splits every sequence along T over this many devices (layers.context_parallel): for
    # sequences too long for one device. Only the kinds in training.sharding's
    # CONTEXT_PARALLEL_KINDS; train.py refuses the others.
    config.mesh.context = 1
    # Logical axis name -> mesh axis ("" = replicated). Only "fsdp" shards parameters, so
    # pure data parallel is mesh.fsdp=1 and FSDP is mesh.fsdp=N with no other change.
    config.mesh.rules = ml_collections.ConfigDict(
        {
            "embed": "fsdp",
            "vocab": "",
            "mlp": "",
            "qkv": "",
            "heads": "",
            "layers": "",
            "experts": "",
            "conv": "",
            "norm": "",
        }
    )

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    # Resuming a workdir whose saved config differs is refused unless this is set.
    config.checkpoint.allow_config_change = False

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 10
    config.log.profile_start_step = -1  # >= 0: write a jax.profiler trace from this step
    config.log.profile_num_steps = 5

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 250  # 0 disables evaluation during training
    config.eval.num_batches = 4
    # Recall evals during training (`evals.recall`), logged as recall/<task>/... scalars.
    config.eval.recall_every_steps = 0  # 0 disables
    config.eval.recall_tasks = ()  # subset of ("mqar", "niah"); () = both for mqar data, else niah
    config.eval.recall_num_examples = 32  # per cell of the MQAR grid / NIAH grid
    config.eval.recall_length_multiples = (1,)  # evaluated lengths, in multiples of data.seq_len
    config.eval.mqar_num_kv_pairs = ()  # () = half, once and twice data.mqar.num_kv_pairs
    config.eval.niah_depths = (0.0, 0.5, 1.0)  # needle depths in [0, 1]
    # Memory behaviour (`evals.memory_behaviour`): per-layer state norm and retrieval errors
    # on held-out sequences, as memory/... scalars and a TensorBoard figure. 0 disables.
    config.eval.memory_every_steps = 0
    return config
