"""Multi-query associative recall (Zoology's MQAR) with a tiny model: the quickest test
of whether a sequence mixer can store and retrieve key-value pairs.

    python train.py --config=configs/mqar.py --workdir=runs/mqar
    python train.py --config=configs/mqar.py:gdn ...   # any block kind: configs/mqar.py:<kind>

The task is the one the recall targets are set for (issue 15; Zoology reports ~100% for
attention and the delta rule at this width): 8 key-value pairs in 64 tokens, vocabulary
128, d_model 64, 2 layers. Every kind ships its own learning rate and step count
(`RECIPES`), chosen by the sweep of `python -m benchmarks.recall_sweep` (results in
`benchmarks/results/mqar_recall.md`): with them each kind reaches `RECALL_TARGETS[kind]` eval
recall from seeds that were not the one tuned on (ATLAS at one seed so far: it trains at
~1K tokens/s). The schedule is constant after the warmup: recall appears in a
sudden jump (the induction circuit forming) whose step varies by a few hundred between
seeds, and a decaying learning rate slows the runs that jump late.
"""

from configs import base

# Eval recall each kind reaches with its recipe (issue 15's targets, and Moneta's since its θ
# cap is its inner step's stability edge). Linear attention, GLA and Memora have none (at 8
# pairs they reached 55-99% all the same: see the results file).
RECALL_TARGETS = {
    "attention": 0.99,
    "swa": 0.99,
    "deltanet": 0.95,
    "gdn": 0.95,
    **dict.fromkeys(
        ("lmm", "mag", "mal", "mac", "atlas", "omeganet", "yaad", "moneta", "mom"), 0.90
    ),
}

# Learning rate, steps and batch of every kind; RECIPES holds where a kind departs from the
# default. Steps are about 1.5-2x the latest step at which a measured seed reached its target
# (attention: seeds 0 and 1 at 1,000 and 1,375 of 1,500, so 2,000). Batch 64 rather than 32:
# on the 4-pair task attention left the plateau at step 500-700 at batch 64 and at
# 1,100-1,900 at batch 32 (seeds 0-2), so the larger batch costs fewer FLOPs too.
DEFAULT_RECIPE = {"learning_rate": 3e-3, "num_steps": 1000, "batch_size": 64}
RECIPES = {
    "attention": {"num_steps": 2000},
    "swa": {"num_steps": 2000},
    "gdn": {"learning_rate": 1e-2},
    "deltanet": {"learning_rate": 1e-2},
    # MoM recalls through its shared memory, a Gated DeltaNet memory (routed memories off: 98%;
    # shared off: 21%), so it takes GDN's learning rate. At the default 3e-3 seed 1 stayed on
    # the plateau (12.5% after 1,000 steps, 13.6% after 2,000; 14.2% after 1,500 at 1e-3); at
    # 1e-2 seeds 0 / 1 / 2 reached 90% at steps 1,000 / 625 / 875 (97.9% / 98.5% / 97.8%
    # after 1,500): 2,000 steps is 2x the latest.
    "mom": {"learning_rate": 1e-2, "num_steps": 2000},
}


def recipe(kind: str) -> dict:
    """The kind's learning rate, steps and batch size: DEFAULT_RECIPE with its RECIPES entry."""
    return {**DEFAULT_RECIPE, **RECIPES.get(kind, {})}


def get_config(variant: str = "attention"):
    config = base.get_config()
    config.data.name = "mqar"
    config.data.seq_len = 64
    config.data.mqar.num_kv_pairs = 8
    config.data.mqar.vocab_size = 128  # Zoology uses 8192; smaller learns faster on a CPU
    config.model.d_model = 64
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.block_pattern = (variant,)
    shipped = recipe(variant)
    config.train.num_steps = shipped["num_steps"]
    config.train.batch_size = shipped["batch_size"]
    config.optim.learning_rate = shipped["learning_rate"]
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 30
    config.optim.weight_decay = 0.0
    config.log.every_steps = 50
    config.eval.every_steps = 250
    config.checkpoint.every_steps = 500
    return config
