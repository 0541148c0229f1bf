"""Grain pipelines: examples -> (shuffled, repeated) stream -> this process's batch slices.

Every process builds the same global example stream; global batch `b` is stream elements
`[b * G, (b + 1) * G)` and process `p` of `P` takes rows `[p * G / P, (p + 1) * G / P)` of it.
In grain terms: batch the stream in local batches of `G / P` and keep every `P`-th local batch
starting at `p`. So the processes' slices concatenated in process order are exactly the
single-process global batch, and the iterator state (`{"next_index": b}`, the number of
global batches consumed) is the same on every process and means the same thing for any
process count.
"""

import sys

import grain
import numpy as np

from data import mqar, prepared, text, tokens
from data.config import document_eos, token_dtype, validate, vocab_size
from data.windows import TokenStream, Windows, held_out_tail_split
from errors import ConfigError

EXAMPLE_STREAM_LENGTH = sys.maxsize  # "infinite": MQAR examples are generated per index


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Returns the per-process batch size after checking the sharding arguments."""
    if global_batch_size <= 0:
        raise ConfigError(f"global_batch_size: must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index {process_index} is not in [0, process_count={process_count})"
        )
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size: {global_batch_size} is not divisible by "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


def read_corpus(data_config, path: str, key: str):
    if data_config.name == "text":
        return text.read_corpus(path, key, data_config.max_bytes)
    return tokens.read_token_corpus(path, key, token_dtype(data_config), vocab_size(data_config))


def _split_paths(data_config, split: str) -> tuple[str, str] | None:
    """(path, config key) that holds exactly the `split` tokens, or None when the split is
    the tail (eval) or all but the tail (train) of data.path."""
    if split == "eval" and data_config.eval_path:
        return data_config.eval_path, "data.eval_path"
    if data_config.name == "tokens" and prepared.is_prepared(data_config.path):
        return prepared.split_file(data_config.path, split), f"data.path ({split} split)"
    if data_config.eval_path:
        return data_config.path, "data.path"
    return None


def corpus_span(data_config, split: str) -> tuple[TokenStream, int, int]:
    """(stream, start, stop): the "train" or "eval" tokens of a text or token corpus.

    A split read from its own file (data.eval_path, or a prepared directory's train.bin /
    eval.bin) is the whole stream; otherwise both come from data.path, eval being its tail.
    """
    own = _split_paths(data_config, split)
    if own is not None:
        stream = read_corpus(data_config, *own)
        return stream, 0, len(stream)
    stream = read_corpus(data_config, data_config.path, "data.path")
    train, held_out = held_out_tail_split(stream, data_config.seq_len, data_config.eval_fraction)
    del train  # the training part is everything before the held-out tail
    if split == "train":
        return stream, 0, held_out.start
    return stream, held_out.start, len(stream)


def _corpus_windows(data_config, split: str) -> Windows:
    """The "train" or "eval" windows of a text or token corpus (see `corpus_span`)."""
    stream, start, stop = corpus_span(data_config, split)
    what = "the training corpus" if split == "train" else "the eval corpus"
    return Windows(stream, start, stop, data_config.seq_len, what, eos_id=document_eos(data_config))


def _process_batches(
    examples: grain.MapDataset, local_batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """Batches `examples` into this process's slices of consecutive global batches."""
    local_batches = examples.batch(local_batch_size, drop_remainder=True)
    return local_batches.slice(slice(process_index, None, process_count))


def build_train_iterator(
    data_config, *, global_batch_size: int, seed: int, process_index: int, process_count: int
) -> grain.DatasetIterator:
    """An infinite iterator over this process's slices of the training global batches.

    Each element is a dict of numpy arrays of shape `[global_batch_size // process_count,
    seq_len]`: "inputs" and "targets" (the next tokens) int32, "mask" float32 (1 where the
    target counts: everywhere for text/tokens, at the query positions for MQAR).
    Text/token windows are shuffled with `seed`, and reshuffled differently (and
    deterministically) every epoch; MQAR examples are drawn from `seed` per index.
    `get_state()` is `{"next_index": <global batches consumed>}`, JSON-serialisable;
    `set_state` on a fresh iterator continues with exactly the batches that would have come.
    """
    validate(data_config)
    local_batch_size = _check_sharding(global_batch_size, process_index, process_count)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2**32) for the data pipeline, got {seed}")
    if data_config.name == "mqar":
        make_example = mqar.MQARExamples(data_config, seed=seed, stream=mqar.TRAIN_STREAM)
        examples = grain.MapDataset.range(EXAMPLE_STREAM_LENGTH).map(make_example)
    else:
        train_windows = _corpus_windows(data_config, "train")
        examples = (
            grain.MapDataset.range(len(train_windows))
            .shuffle(seed=seed)
            .repeat()  # reseeds the shuffle with the epoch number: a new order every epoch
            .map(train_windows)
        )
    batches = _process_batches(examples, local_batch_size, process_index, process_count)
    read_options = grain.ReadOptions(
        num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch_batches
    )
    return iter(batches.to_iter_dataset(read_options))


def build_eval_batches(
    data_config, *, global_batch_size: int, num_batches: int, process_index: int, process_count: int
) -> list[dict[str, np.ndarray]]:
    """`num_batches` held-out batches (this process's slices), the same on every call.

    Text/tokens: the windows of `eval_path`, or of the held-out tail, in order; if there
    are fewer than `num_batches * global_batch_size` windows they are cycled. MQAR: the
    fixed eval stream (seed `mqar.EVAL_SEED`, stream `mqar.EVAL_STREAM`), never a training
    example stream.
    """
    validate(data_config)
    local_batch_size = _check_sharding(global_batch_size, process_index, process_count)
    if num_batches <= 0:
        raise ConfigError(f"num_batches: must be positive, got {num_batches}")
    if data_config.name == "mqar":
        make_example = mqar.MQARExamples(data_config, seed=mqar.EVAL_SEED, stream=mqar.EVAL_STREAM)
        examples = grain.MapDataset.range(EXAMPLE_STREAM_LENGTH).map(make_example)
    else:
        held_out = _corpus_windows(data_config, "eval")
        examples = grain.MapDataset.range(len(held_out)).repeat().map(held_out)
    batches = _process_batches(examples, local_batch_size, process_index, process_count)
    return [batches[index] for index in range(num_batches)]
