"""The Miras models (Behrouz et al. 2025, "It's All Connected", §5) — Moneta, Yaad, Memora,
the block kinds of `models.miras` — on multi-query associative recall, the rest as
`configs/mqar.py` (and its chunk size 8 as `configs/titans.py`).

    python train.py --config=configs/miras.py:moneta --workdir=runs/moneta
    python train.py --config=configs/miras.py:yaad_hybrid --workdir=runs/yaad_hybrid
    python train.py --config=configs/miras.py:memora --config.model.memora.chunk_size=1 ...
    python train.py --config=configs/miras.py:memora --config.model.memora.kl_chunk_form=exact
    python train.py --config=configs/miras.py:moneta --config.model.moneta.lq_normaliser=chunk_start

"<kind>" stacks two memory blocks; "<kind>_hybrid" alternates the memory block with
sliding-window attention ("swa", a 16-token window: a quarter of the 64-token sequence, so
recall past it has to go through the memory), as `configs/gdn_hybrid.py` does for Gated
DeltaNet. Any other mix is a `--config.model.block_pattern` override, e.g.
'("moneta", "moneta", "moneta", "swa")' with `--config.model.num_layers=4`.
"""

from configs import mqar
from errors import ConfigError

KINDS = ("moneta", "yaad", "memora")
VARIANTS = KINDS + tuple(f"{kind}_hybrid" for kind in KINDS)
HYBRID_WINDOW = 16


def memory_config(kind: str, *, hybrid: bool):
    """MQAR with `kind` memory blocks alone, or alternating with sliding-window attention."""
    config = mqar.get_config(kind)
    config.model[kind].chunk_size = 8
    if hybrid:
        config.model.block_pattern = (kind, "swa")
        config.model.swa.window = HYBRID_WINDOW
    return config


def get_config(variant: str = "moneta"):
    if variant not in VARIANTS:
        raise ConfigError(f"configs/miras.py: variant {variant!r} is not one of {VARIANTS}")
    kind = variant.removesuffix("_hybrid")
    return memory_config(kind, hybrid=variant.endswith("_hybrid"))
