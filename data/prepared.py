"""A prepared token corpus: the directory `python -m data.prepare` writes.

    DIR/train.bin        the training tokens (raw, `dtype`), documents each ending in eos
    DIR/eval.bin         held-out documents, the same way
    DIR/tokenizer.json   the Hugging Face `tokenizers` tokenizer that produced them
    DIR/meta.json        what the pipeline needs to read them (`Meta`)

`--config.data.name=tokens --config.data.path=DIR` needs nothing else: the vocabulary size,
dtype and eos id come from meta.json, train.bin and eval.bin are the two splits, and every
window carries `segment_ids` that start a new segment at each eos input token (see
`data.windows.Windows`), so memory blocks reset between documents.
"""

import dataclasses
import json
import os

from errors import DataError

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_FILE = "train.bin"
EVAL_FILE = "eval.bin"
FORMAT = "mnemax.tokens.v1"


@dataclasses.dataclass(frozen=True)
class Meta:
    """meta.json: vocab_size, eos_id, dtype ("uint16" | "uint32"), and counts per split."""

    vocab_size: int
    eos_id: int
    dtype: str
    train_tokens: int
    eval_tokens: int
    train_documents: int
    eval_documents: int
    train_bytes: int  # UTF-8 bytes of the text the tokens encode, for bits per byte
    eval_bytes: int
    source: str
    tokenizer: str  # how the tokenizer came about: trained here, or the file it was read from
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def is_prepared(path: str) -> bool:
    """Whether `path` is a directory holding a meta.json (a prepared corpus)."""
    return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path), META_FILE))


def read_meta(path: str) -> Meta:
    """The Meta of the prepared corpus at `path` (DataError naming the file if unusable)."""
    file = os.path.join(os.path.expanduser(path), META_FILE)
    try:
        with open(file) as handle:
            fields = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not a readable meta.json ({error})") from None
    names = {field.name for field in dataclasses.fields(Meta)}
    missing = sorted(names - set(fields) - {"format"})
    if not isinstance(fields, dict) or missing:
        raise DataError(f"{file}: missing {', '.join(missing)} (rerun python -m data.prepare)")
    if fields.get("format", FORMAT) != FORMAT:
        raise DataError(f"{file}: format {fields['format']!r}, this code reads {FORMAT!r}")
    meta = Meta(**{name: fields[name] for name in names if name in fields})
    if meta.dtype not in ("uint16", "uint32") or not 0 <= meta.eos_id < meta.vocab_size:
        raise DataError(f"{file}: dtype {meta.dtype!r} / eos_id {meta.eos_id} are not usable")
    return meta


def split_file(path: str, split: str) -> str:
    """DIR/train.bin or DIR/eval.bin."""
    name = TRAIN_FILE if split == "train" else EVAL_FILE
    return os.path.join(os.path.expanduser(path), name)
