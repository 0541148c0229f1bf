"""Memory Caching (Behrouz et al., "Memory Caching: RNNs with Growing Memory") on
multi-query associative recall: every block is "gdn_mc" or "lmm_mc"
(`models.memory_caching_blocks`), the rest as `configs/mqar.py` with the wrapped kind's
recipe (gdn: lr 1e-2; lmm: as `configs/titans.py:lmm`, chunk_size 8).

    python train.py --config=configs/memory_caching.py:gdn --workdir=runs/gdn_mc
    python train.py --config=configs/memory_caching.py:lmm --workdir=runs/lmm_mc \
        --config.model.lmm_mc.aggregation=ssc --config.model.lmm_mc.top_k=1

Segments of 16 tokens: the 64-token sequence ends with three cached states (the 8 pairs sit
in the first segment), so recall can go through a cached state as well as the online memory.
"""

from configs import mqar
from errors import ConfigError

VARIANTS = {"gdn": "gdn_mc", "lmm": "lmm_mc"}


def get_config(variant: str = "gdn"):
    if variant not in VARIANTS:
        raise ConfigError(
            f"configs/memory_caching.py: variant {variant!r} is not one of {tuple(VARIANTS)}"
        )
    kind = VARIANTS[variant]
    config = mqar.get_config(kind)
    shipped = mqar.recipe(variant)  # the wrapped kind's learning rate, steps and batch
    config.train.num_steps = shipped["num_steps"]
    config.train.batch_size = shipped["batch_size"]
    config.optim.learning_rate = shipped["learning_rate"]
    section = config.model[kind]
    section.segment_size = 16
    if variant == "lmm":
        section.chunk_size = 8
    return config
