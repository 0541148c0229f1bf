"""Linear attention (Katharopoulos et al. 2020; here with ℓ2-normalised q/k, short convs and
the gated output block of Gated DeltaNet) on multi-query associative recall: every block is
a "linear_attention" block (`models.matrix_memory_blocks`), the rest as in `configs/mqar.py`.

    python train.py --config=configs/linear_attention.py --workdir=runs/linear_attention
    python train.py --config=configs/linear_attention.py --workdir=runs/la_noconv \
        --config.model.linear_attention.conv_size=0
"""

from configs import mqar


def get_config():
    return mqar.get_config("linear_attention")
