"""Gated DeltaNet (Yang et al. 2025) on multi-query associative recall: every block is a
"gdn" block (`models.matrix_memory_blocks`), everything else as in `configs/mqar.py`.

    python train.py --config=configs/gdn.py --workdir=runs/gdn
    python train.py --config=configs/gdn.py --workdir=runs/gdn_v2 \
        --config.model.gdn.expand_v=2 --config.model.gdn.conv_size=0
"""

from configs import mqar


def get_config():
    return mqar.get_config("gdn")
