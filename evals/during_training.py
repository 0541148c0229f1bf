"""The eval hooks of the training loop: recall (`evals.recall`) and memory behaviour
(`evals.memory_behaviour`) every `eval.recall_every_steps` / `eval.memory_every_steps` steps
and at the last step, on the current parameters, logged through the run's MetricsLogger
(TensorBoard scalars and metrics.jsonl; the memory figure as a TensorBoard image).

Defaults (configs/base.py): recall tasks "mqar" and "niah" for MQAR runs, "niah" otherwise;
lengths `recall_length_multiples` x data.seq_len; MQAR pairs half, once and twice the
training's; NIAH depths `niah_depths`. The memory trace reads `MEMORY_ROWS` held-out
sequences (the first rows of the eval set).

Single-process runs only: with several processes the parameters are spread over hosts, and
the hooks say once that they are off (evaluate the checkpoints with `python -m evals.recall`).
"""

import jax
import numpy as np
from flax import nnx

import data as data_lib
from evals import memory_behaviour, recall

MEMORY_ROWS = 4


def default_tasks(config) -> tuple[str, ...]:
    return ("mqar", "niah") if config.data.name == "mqar" else ("niah",)


def default_kv_pairs(num_kv_pairs: int) -> list[int]:
    return sorted({max(1, num_kv_pairs // 2), num_kv_pairs, 2 * num_kv_pairs})


class TrainingEvals:
    """Runs the configured hooks when they are due; `run(step, params)` -> logged scalars."""

    def __init__(self, config, spec, logger):
        self.config, self.spec, self.logger = config, spec, logger
        eval_config = config.eval
        self.recall_every = eval_config.recall_every_steps
        self.memory_every = eval_config.memory_every_steps
        self.enabled = jax.process_count() == 1
        if not self.enabled and (self.recall_every or self.memory_every):
            logger.message(
                "recall / memory evals during training run in single-process runs only; "
                "evaluate the checkpoints with python -m evals.recall"
            )
        self._memory_tokens = None

    def _due(self, every, step):
        return (
            self.enabled
            and every > 0
            and (step % every == 0 or step == self.config.train.num_steps)
        )

    def due(self, step: int) -> bool:
        return self._due(self.recall_every, step) or self._due(self.memory_every, step)

    def run(self, step: int, params) -> dict[str, float]:
        model = nnx.merge(self.spec.graphdef, params, self.spec.rest)
        scalars = {}
        if self._due(self.recall_every, step):
            scalars.update(self._recall(model))
        if self._due(self.memory_every, step):
            scalars.update(self._memory(model, step))
        if scalars:
            self.logger.write(step, scalars)
        return scalars

    def _recall(self, model) -> dict[str, float]:
        config, eval_config = self.config, self.config.eval
        lengths = [m * config.data.seq_len for m in eval_config.recall_length_multiples]
        num_examples = eval_config.recall_num_examples
        kv_pairs = list(eval_config.mqar_num_kv_pairs) or default_kv_pairs(
            config.data.mqar.num_kv_pairs
        )
        scalars, summary = {}, []
        for task in tuple(eval_config.recall_tasks) or default_tasks(config):
            result = recall.run_task(
                task,
                model,
                config,
                seq_lens=lengths,
                num_kv_pairs=kv_pairs,
                context_lengths=lengths,
                depths=list(eval_config.niah_depths),
                num_examples=num_examples,
                batch_size=min(num_examples, 32),
            )
            task_scalars = recall.summary_scalars(task, result)
            scalars.update(task_scalars)
            mean = task_scalars.get(f"recall/{task}_mean")
            summary.append(f"{task} {mean:.4f}" if mean is not None else f"{task} (no cell fits)")
        self.logger.message("recall (mean accuracy): " + ", ".join(summary))
        return scalars

    def _memory(self, model, step) -> dict[str, float]:
        if self._memory_tokens is None:
            batch = data_lib.build_eval_batches(
                self.config.data,
                global_batch_size=MEMORY_ROWS,
                num_batches=1,
                process_index=0,
                process_count=1,
            )[0]
            self._memory_tokens = np.asarray(batch["inputs"])
        traced = memory_behaviour.trace(model, self._memory_tokens)
        scalars = memory_behaviour.scalars(traced)
        if scalars:  # a model without a traced memory has nothing to draw
            self.logger.figure(step, "memory/behaviour", memory_behaviour.figure(traced))
        return scalars
