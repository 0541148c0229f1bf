"""Evals of trained models: recall, language modelling, memory behaviour.

Command lines (on a workdir written by train.py; results go to DIR/evals/*.json, a table to
stdout; bad input is one line `error: ...`, exit code 2):

    python -m evals.recall --workdir=DIR [--task=mqar|niah|all] [--step=N]
        [--seq_lens=64,128,256] [--num_kv_pairs=4,8,16,32,64]      (MQAR grid)
        [--context_lengths=64,128,256] [--depths=0,0.25,0.5,0.75,1] (S-NIAH grid)
        [--num_examples=128] [--batch_size=32]
    python -m evals.language_modeling --workdir=DIR [--multiples=1,2,4,8] [--num_windows=16]
        [--batch_size=8] [--step=N]

Python API (for notebooks and benchmarks; `model` is a `models.lm.LanguageModel`, e.g.
`evals.common.restore(workdir).model` or one built with `models.registry.build_model`):

    common.restore(workdir, step=None) -> Restored(model, config, step)
    common.token_scores(model, inputs, targets, *, batch_size=32)
        -> (loss [N, T] nats, hit [N, T] bool): per-token cross-entropy and argmax hit
    recall.mqar_sweep(model, mqar_config, *, seq_lens, num_kv_pairs, num_examples=128,
        batch_size=32) -> {"cells": [{seq_len, num_kv_pairs, accuracy, loss, num_examples}],
        "skipped": [...]}                      (mqar_config: a `data.mqar` config section)
    recall.niah_grid(model, *, format, vocab_size, context_lengths, depths, num_examples=64,
        batch_size=32, seed=0) -> {"format", "cells": [{context_length, depth, accuracy,
        exact_match, num_examples}], "skipped": [...]}   (format "text" or "tokens")
    recall.run_task(task, model, config, **grid) -> the above with a run config's defaults
    recall.niah_format(config) -> (format, vocab_size) for a run config
    language_modeling.extrapolation(model, data_config, *, multiples=(1, 2, 4, 8),
        num_windows=16, batch_size=8) -> {"unit", "train_seq_len", "lengths": [{multiple,
        seq_len, loss, bits_per_token, perplexity, bucket_loss, num_windows} | {..., error}]}
    memory_behaviour.trace(model, tokens [B, T]) -> {"layer_00": {"kind", "state_norm",
        "error_before", "error_after", "recall_error", "value_norm": [T] numpy}, ...,
        "layer_01": {"kind", "skipped": reason}}
    memory_behaviour.scalars(traced) -> {"memory/layer_00/state_norm": float, ...}
    memory_behaviour.figure(traced) -> matplotlib Figure

S-NIAH examples themselves: `data.niah.niah_example` / `niah_batch`.

During training (config `eval` section, see configs/base.py): `eval.recall_every_steps`
(recall/<task>/... scalars and recall/<task>_mean), `eval.recall_tasks`,
`eval.recall_num_examples`, `eval.recall_length_multiples`, `eval.mqar_num_kv_pairs`,
`eval.niah_depths`, and `eval.memory_every_steps` (memory/layer_ii/... scalars and the
"memory/behaviour" figure), all in TensorBoard and metrics.jsonl (`evals.during_training`).
"""
