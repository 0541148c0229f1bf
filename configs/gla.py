"""GLA with one data-dependent decay per head and step (flash-linear-attention's "simple
GLA", decay parametrised as in Gated DeltaNet) on multi-query associative recall: every block
is a "gla" block (`models.matrix_memory_blocks`), the rest as in `configs/mqar.py`.

    python train.py --config=configs/gla.py --workdir=runs/gla
    python train.py --config=configs/gla.py --workdir=runs/gla_v2 --config.model.gla.expand_v=2
"""

from configs import mqar


def get_config():
    return mqar.get_config("gla")
