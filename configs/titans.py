"""Titans (Behrouz et al. 2024) on multi-query associative recall: every block is one of the
Titans kinds of `models.titans` ("lmm", "mac", "mag", "mal"); the rest as `configs/mqar.py`.

    python train.py --config=configs/titans.py:mag --workdir=runs/titans_mag
    python train.py --config=configs/titans.py:lmm --workdir=runs/lmm \
        --config.model.lmm.architecture=matrix --config.model.lmm.rule=gd

The attention of mal / mag sees 8 tokens and MAC's attention one 16-token segment, less
than the 64-token MQAR sequence, so recall past that has to go through the neural memory
(the 8 pairs fill MAC's first segment: every answer comes from the memory). MAC trains its
memory on the residual stream by default (`model.mac.write_stream`; see `models.titans_mac`).
"""

from configs import mqar
from errors import ConfigError

VARIANTS = ("lmm", "mac", "mag", "mal")


def get_config(variant: str = "mag"):
    if variant not in VARIANTS:
        raise ConfigError(f"configs/titans.py: variant {variant!r} is not one of {VARIANTS}")
    config = mqar.get_config(variant)
    section = config.model[variant]
    section.chunk_size = 8
    if variant in ("mal", "mag"):
        section.window = 8
    if variant == "mac":
        section.segment_size = 16
    return config
