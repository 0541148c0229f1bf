"""MQAR: multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving
Recall in Efficient Language Models"), in the format of HazyResearch/zoology's `multiquery_ar`.

A sequence starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`: keys drawn without
replacement from `[1, V/2)`, values from `[V/2, V)`. After this context, each queried key
appears once more, at position `context + 2 * gap`; the model must predict, right after the
queried key, the value it was paired with. Gaps are drawn without replacement from
`0 .. space-1` (`space = (seq_len - context) // 2`) with Zoology's power law
`p(gap = g - 1) ∝ a · g^(a - 1)`, `g = 1..space`, which puts most queries near the context.
All other positions hold random tokens (or 0 with `random_non_queries=False`).

Example `i` of a stream is generated from `np.random.default_rng([seed, stream, i])`, so the
dataset is random-access and infinite; the training stream (0) and the eval stream (1) can
never produce the same sequence of random draws, whatever the training seed.

Zoology scores the value at the query position and ignores every other label (-100); here
`targets` holds the next token everywhere and `mask` is 1 exactly at the query positions,
where `targets` is the paired value.
"""

import numpy as np

TRAIN_STREAM = 0
EVAL_STREAM = 1
EVAL_SEED = 0  # the eval set is fixed: the same for every run and every training seed


class MQARExamples:
    """Callable on an example index: the MQAR example of that index in stream (seed, stream)."""

    def __init__(self, data_config, *, seed: int, stream: int):
        mqar = data_config.mqar
        self.seq_len = data_config.seq_len
        self.vocab_size = mqar.vocab_size
        self.num_kv_pairs = mqar.num_kv_pairs
        self.num_queries = mqar.num_queries or mqar.num_kv_pairs
        self.random_non_queries = mqar.random_non_queries
        self.seed = seed
        self.stream = stream
        self.context_size = 2 * self.num_kv_pairs
        space = (self.seq_len - self.context_size) // 2
        gap_rank = np.arange(1, space + 1, dtype=np.float64)
        weights = mqar.power_a * gap_rank ** (mqar.power_a - 1.0)
        self.gap_probabilities = weights / weights.sum()

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.stream, index])
        half = self.vocab_size // 2
        keys = 1 + rng.choice(half - 1, size=self.num_kv_pairs, replace=False)
        values = half + rng.choice(self.vocab_size - half, size=self.num_kv_pairs, replace=False)
        gaps = rng.choice(
            len(self.gap_probabilities),
            size=self.num_queries,
            replace=False,
            p=self.gap_probabilities,
        )
        # One token more than seq_len, so the last input also has a next-token target.
        sequence = np.zeros(self.seq_len + 1, np.int64)
        if self.random_non_queries:
            sequence[:] = rng.integers(0, self.vocab_size, size=self.seq_len + 1)
        sequence[0 : self.context_size : 2] = keys
        sequence[1 : self.context_size : 2] = values
        # Keys are already in random order, so the first num_queries of them are a random
        # subset; each goes to its own gap, in random order relative to the context.
        query_positions = self.context_size + 2 * gaps
        sequence[query_positions] = keys[: self.num_queries]
        targets = sequence[1:].copy()
        targets[query_positions] = values[: self.num_queries]
        mask = np.zeros(self.seq_len, np.float32)
        mask[query_positions] = 1.0
        return {
            "inputs": sequence[:-1].astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": mask,
        }
