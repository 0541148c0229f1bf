"""S-NIAH: single needle in a haystack, passkey style (Mohtashami & Jaggi 2023, "Landmark
Attention"; the "S-NIAH" single-needle tasks of RULER, Hsieh et al. 2024).

One fact (the needle) is hidden at a chosen depth of a long stretch of filler (the haystack);
the sequence ends with a query whose continuation is the fact's answer. A model recalls the
needle if it predicts every answer token. Two formats, one per kind of model:

"text" (byte-level models, vocabulary 256): the classic passkey prompt, in bytes,

    <filler ...> The pass key is 51872. <filler ...> What is the pass key? The pass key is 51872
                 ^ needle at depth d                                                      ^ answer

    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
    back again. " repeated (cut to length, possibly mid-sentence); the key is 5 random digits.

"tokens" (token models, e.g. MQAR-trained, vocabulary V >= 8): MQAR's vocabulary convention
(keys from [1, V/2), values from [V/2, V); Zoology), a single key-value pair as the needle,

    <random tokens ...> k v <random tokens ...> k v
                        ^ needle at depth d     ^ query, then the answer v

    the random tokens are uniform over [0, V) except k, so the query has one match.

Layout: the sequence has `context_length + 1` tokens, `inputs = seq[:-1]`, `targets =
seq[1:]` (length `context_length`), and `mask` is 1 exactly at the positions whose target is
an answer token: the answer is the last `len(answer)` targets, scored with teacher forcing
(so "every masked argmax is right" equals "greedy decoding after the query gives the
answer"). Depth d in [0, 1] puts the needle's first token at `round(d * H)` of the haystack
of H filler tokens (d = 0: the first token of the sequence; d = 1: right before the query).

Example `index` is drawn from `np.random.default_rng([seed, NIAH_STREAM, index])`: random
access and deterministic, and never the same draws as an MQAR stream.
"""

import numpy as np

from errors import ConfigError

FORMATS = ("text", "tokens")
NIAH_STREAM = 2  # MQAR uses streams 0 (train) and 1 (eval)
FILLER = (
    b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUERY = b"What is the pass key? The pass key is "
KEY_DIGITS = 5


def _text_parts(rng):
    key = b"%05d" % rng.integers(0, 10**KEY_DIGITS)
    return b"The pass key is " + key + b". ", QUERY, key


def _filler_bytes(length: int) -> np.ndarray:
    repeats = -(-length // len(FILLER))
    return np.frombuffer(FILLER * repeats, np.uint8)[:length].astype(np.int64)


def overhead(format: str) -> int:
    """Tokens of a sequence that are not haystack: needle + query + answer (- 1 for the
    `context_length + 1` layout); the smallest usable context_length is this, plus 0 filler."""
    if format == "text":
        needle, query, answer = _text_parts(np.random.default_rng(0))
        return len(needle) + len(query) + len(answer) - 1
    return 3  # k v ... k v: 4 tokens, minus the one extra target token


def niah_example(
    format: str,
    *,
    context_length: int,
    depth: float,
    index: int,
    seed: int = 0,
    vocab_size: int = 256,
) -> dict[str, np.ndarray]:
    """The S-NIAH example `index`: inputs, targets (int32), mask (float32) [context_length],
    plus needle_start (position of the needle's first token in `inputs`) and answer (the
    answer tokens, int32), for checks and inspection."""
    if format not in FORMATS:
        raise ConfigError(f"niah format: {format!r} is not one of {', '.join(FORMATS)}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"niah depth: must be in [0, 1], got {depth}")
    haystack_length = context_length - overhead(format)
    if haystack_length < 0:
        raise ConfigError(
            f"niah context_length: {context_length} is too short for the {format!r} format "
            f"(needle, query and answer take {overhead(format) + 1} tokens)"
        )
    rng = np.random.default_rng([seed, NIAH_STREAM, index])
    if format == "text":
        if vocab_size < 256:
            raise ConfigError(f"niah vocab_size: the text format needs 256 bytes, got {vocab_size}")
        needle_bytes, query_bytes, answer_bytes = _text_parts(rng)
        as_tokens = lambda b: np.frombuffer(b, np.uint8).astype(np.int64)  # noqa: E731
        needle, query, answer = map(as_tokens, (needle_bytes, query_bytes, answer_bytes))
        haystack = _filler_bytes(haystack_length)
    else:
        if vocab_size < 8:
            raise ConfigError(f"niah vocab_size: the tokens format needs >= 8, got {vocab_size}")
        half = vocab_size // 2
        key = int(1 + rng.integers(0, half - 1))
        value = int(half + rng.integers(0, vocab_size - half))
        # Uniform over the vocabulary without the key: draw from V - 1 symbols, skip the key.
        haystack = rng.integers(0, vocab_size - 1, size=haystack_length)
        haystack = haystack + (haystack >= key)
        needle, query, answer = (
            np.array(part, np.int64) for part in ([key, value], [key], [value])
        )
    needle_start = int(round(depth * haystack_length))
    sequence = np.concatenate(
        [haystack[:needle_start], needle, haystack[needle_start:], query, answer]
    )
    mask = np.zeros(context_length, np.float32)
    mask[context_length - len(answer) :] = 1.0
    return {
        "inputs": sequence[:-1].astype(np.int32),
        "targets": sequence[1:].astype(np.int32),
        "mask": mask,
        "needle_start": np.int32(needle_start),
        "answer": answer.astype(np.int32),
    }


def niah_batch(
    format: str,
    *,
    context_length: int,
    depth: float,
    indices,
    seed: int = 0,
    vocab_size: int = 256,
) -> dict[str, np.ndarray]:
    """`niah_example` for each of `indices`, stacked: inputs, targets, mask [N, T]."""
    examples = [
        niah_example(
            format,
            context_length=context_length,
            depth=depth,
            index=int(index),
            seed=seed,
            vocab_size=vocab_size,
        )
        for index in indices
    ]
    return {key: np.stack([e[key] for e in examples]) for key in ("inputs", "targets", "mask")}
