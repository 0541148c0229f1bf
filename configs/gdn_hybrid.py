"""A Gated DeltaNet / sliding-window attention hybrid (three "gdn" blocks, then one "swa"
block, as in the hybrids of Yang et al. 2025, §4) on multi-query associative recall, the
rest as in `configs/mqar.py`. The window (16 tokens) is a quarter of the 64-token sequence,
so the attention layers cannot do the recall alone.

    python train.py --config=configs/gdn_hybrid.py --workdir=runs/gdn_hybrid
    python train.py --config=configs/gdn_hybrid.py --workdir=runs/gdn_hybrid_w32 \
        --config.model.swa.window=32
"""

from configs import mqar


def get_config():
    config = mqar.get_config("gdn")
    config.model.num_layers = 4
    config.model.block_pattern = ("gdn", "gdn", "gdn", "swa")
    config.model.swa.window = 16
    return config
