"""DeltaNet (Yang et al. 2024, delta rule without decay) on multi-query associative recall:
every block is a "deltanet" block (`models.matrix_memory_blocks`), the rest as in `configs/mqar.py`.

    python train.py --config=configs/deltanet.py --workdir=runs/deltanet
    python train.py --config=configs/deltanet.py --workdir=runs/deltanet_h4 \
        --config.model.deltanet.num_heads=4 --config.model.deltanet.head_dim=16
"""

from configs import mqar


def get_config():
    return mqar.get_config("deltanet")
