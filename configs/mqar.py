"""Multi-query associative recall (Zoology's MQAR) with a tiny model: the quickest test
of whether a sequence mixer can store and retrieve key-value pairs.

    python train.py --config=configs/mqar.py --workdir=runs/mqar
    python train.py --config=configs/mqar.py:swa ...   # sliding-window attention instead
"""

from configs import base


def get_config(variant: str = "attention"):
    config = base.get_config()
    config.data.name = "mqar"
    config.data.seq_len = 64
    config.data.mqar.num_kv_pairs = 8
    config.data.mqar.vocab_size = 512  # Zoology uses 8192; smaller learns faster on a CPU
    config.model.d_model = 64
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.block_pattern = (variant,)
    config.train.num_steps = 300
    config.train.batch_size = 32
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.0
    config.log.every_steps = 20
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    return config
