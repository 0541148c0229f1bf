"""Mixture-of-Memories (Du et al. 2025) on multi-query associative recall: every block is a
"mom" block (`layers.mixture_of_memories`: 4 gated-delta-rule memories, top-2 routing, a
shared memory, load-balancing loss 0.01), the rest as in `configs/mqar.py`.

    python train.py --config=configs/mom.py --workdir=runs/mom
    python train.py --config=configs/mom.py:deltanet --workdir=runs/mom_deltanet
    python train.py --config=configs/mom.py --workdir=runs/mom_8x1 \
        --config.model.mom.num_memories=8 --config.model.mom.top_k=1

The optional argument is the memories' rule: gated_deltanet (default), deltanet, gla or
linear_attention.
"""

from configs import mqar

VARIANTS = ("gated_deltanet", "deltanet", "gla", "linear_attention")


def get_config(rule: str = "gated_deltanet"):
    config = mqar.get_config("mom")
    config.model.mom.rule = rule
    return config
