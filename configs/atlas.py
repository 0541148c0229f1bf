"""ATLAS and OmegaNet (Behrouz et al. 2025, "Atlas: Learning to Optimally Memorize the
Context at Test Time"), the block kinds "atlas" (Omega rule + polynomial features + Muon)
and "omeganet" (Omega rule + polynomial features + GD) of `models.miras`, on multi-query
associative recall; the rest as `configs/mqar.py` (chunk size 8 as `configs/titans.py`).

    python train.py --config=configs/atlas.py:atlas --workdir=runs/atlas
    python train.py --config=configs/atlas.py:omeganet_hybrid --workdir=runs/omeganet_hybrid
    python train.py --config=configs/atlas.py:atlas --config.model.atlas.omega_window=8 ...

"<kind>" stacks two memory blocks; "<kind>_hybrid" alternates the memory block with
16-token sliding-window attention (see `configs/miras.py`). The Omega window (c = 4) is
shorter than a chunk (8), and spans chunk boundaries.
"""

from configs.miras import memory_config
from errors import ConfigError

KINDS = ("atlas", "omeganet")
VARIANTS = KINDS + tuple(f"{kind}_hybrid" for kind in KINDS)


def get_config(variant: str = "atlas"):
    if variant not in VARIANTS:
        raise ConfigError(f"configs/atlas.py: variant {variant!r} is not one of {VARIANTS}")
    kind = variant.removesuffix("_hybrid")
    return memory_config(kind, hybrid=variant.endswith("_hybrid"))
