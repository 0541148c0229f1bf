"""Linear attention (Katharopoulos et al. 2020: q, k through elu + 1, each readout divided by
z_t^T q_t; here with short convs and a SiLU output gate around it) on multi-query
associative recall: every block is a "linear_attention" block
(`models.matrix_memory_blocks`), the rest as in `configs/mqar.py`.

    python train.py --config=configs/linear_attention.py --workdir=runs/linear_attention
    python train.py --config=configs/linear_attention.py --workdir=runs/la_noconv \
        --config.model.linear_attention.conv_size=0
    # the un-normalised outer-product memory with Gated DeltaNet's ℓ2(SiLU) features:
    python train.py --config=configs/linear_attention.py --workdir=runs/la_plain \
        --config.model.linear_attention.feature_map=silu_l2 \
        --config.model.linear_attention.normalize=False
"""

from configs import mqar


def get_config():
    return mqar.get_config("linear_attention")
