"""Fixed-length training windows over a token stream made of one or more (memory-mapped) arrays.

A window `i` of a span `[start, stop)` is the `seq_len + 1` tokens beginning at
`start + i * seq_len`: consecutive windows share one token, so every token of the span is a
next-token target exactly once per epoch. Windows are random-access, so shuffling them is a
permutation of indices, never a pass over the data.
"""

import dataclasses

import numpy as np

from errors import DataError


@dataclasses.dataclass(frozen=True)
class TokenPart:
    """One file's tokens: a numpy array or memmap that is only sliced, never loaded whole."""

    name: str
    tokens: np.ndarray


class TokenStream:
    """The concatenation of several token arrays, read by slicing without copying the whole.

    `vocab_limit`, when given, is checked on every slice that is read: a token outside
    `[0, vocab_limit)` raises DataError naming its file, even if the open-time scan missed it.
    """

    def __init__(self, parts: list[TokenPart], vocab_limit: int | None = None):
        self.parts = parts
        self.vocab_limit = vocab_limit
        lengths = [len(part.tokens) for part in parts]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def describe(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0].name
        return f"{self.parts[0].name} (+{len(self.parts) - 1} more files)"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the concatenation, as int64."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        position = start
        part_index = first
        while position < stop:
            part = self.parts[part_index]
            local_start = position - int(self.offsets[part_index])
            local_stop = min(stop, int(self.offsets[part_index + 1])) - int(
                self.offsets[part_index]
            )
            piece = np.asarray(part.tokens[local_start:local_stop], dtype=np.int64)
            if self.vocab_limit is not None:
                check_token_range(piece, self.vocab_limit, part.name, local_start)
            pieces.append(piece)
            position += local_stop - local_start
            part_index += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def check_token_range(tokens: np.ndarray, vocab_limit: int, name: str, offset: int = 0) -> None:
    """Raises DataError if any token is negative or >= vocab_limit (first offender named)."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high < vocab_limit:
        return
    bad = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_limit))[0])
    raise DataError(
        f"{name}: token {int(tokens[bad])} at index {offset + bad} is outside "
        f"[0, data.vocab_size={vocab_limit})"
    )


class Windows:
    """The `seq_len + 1`-token windows of `stream[start:stop]`, as LM examples.

    Callable on a window index (grain maps it over `MapDataset.range(len(windows))`).
    With `eos_id`, each example also has "segment_ids" [seq_len] int32: a new segment
    starts at every input position that holds eos, so the eos closing a document opens the
    next one as its first token (the one that predicts the document's first real token),
    and nothing of one document is seen while predicting another.
    """

    def __init__(
        self,
        stream: TokenStream,
        start: int,
        stop: int,
        seq_len: int,
        what: str,
        *,
        eos_id: int | None = None,
    ):
        self.stream = stream
        self.eos_id = eos_id
        self.start = start
        self.seq_len = seq_len
        self.count = max(0, (stop - start - 1) // seq_len)
        if self.count == 0:
            raise DataError(
                f"{stream.describe()}: {what} has {stop - start} tokens, too short for one "
                f"sequence of data.seq_len={seq_len} (+1 target token)"
            )

    def __len__(self) -> int:
        return self.count

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        begin = self.start + index * self.seq_len
        window = self.stream.read(begin, begin + self.seq_len + 1)
        example = {
            "inputs": window[:-1].astype(np.int32),
            "targets": window[1:].astype(np.int32),
            "mask": np.ones(self.seq_len, np.float32),
        }
        if self.eos_id is not None:
            example["segment_ids"] = document_segments(example["inputs"], self.eos_id)
        return example


def document_segments(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Segment ids [..., T] int32 of input tokens: +1 at every eos (see `Windows`)."""
    return np.cumsum(inputs == eos_id, axis=-1, dtype=np.int32)


def held_out_tail_split(
    stream: TokenStream, seq_len: int, eval_fraction: float
) -> tuple[Windows, Windows]:
    """Training windows and held-out windows, the held-out ones from the tail of `stream`.

    The tail is `max(eval_fraction * len, seq_len + 1)` tokens, so it always holds one
    window, and training windows end before it begins: no token is a target in both.
    """
    total = len(stream)
    eval_tokens = max(int(round(eval_fraction * total)), seq_len + 1)
    if total < eval_tokens + seq_len + 1:
        raise DataError(
            f"{stream.describe()}: {total} tokens, too short for one training and one held-out "
            f"sequence of data.seq_len={seq_len} (set data.eval_path or use more data)"
        )
    split = total - eval_tokens
    train = Windows(stream, 0, split, seq_len, "the training part (before the held-out tail)")
    held_out = Windows(stream, split, total, seq_len, "the held-out tail")
    return train, held_out
