"""Tokenize a local corpus into the directory `data.name=tokens` trains on.

    python -m data.prepare --input=corpus/ --output=data/corpus-bpe8k --vocab_size=8192
    python -m data.prepare --input=docs.jsonl --output=data/docs --tokenizer=tokenizer.json

--input is a text file, a directory of them, or JSON Lines / Parquet files with a text
field (`data.documents`). With --vocab_size a byte-level BPE (GPT-2's scheme: every byte is
a token, so any text round-trips exactly) is trained on the input with Hugging Face
`tokenizers`; with --tokenizer an existing `tokenizer.json` is used. Each document is
encoded, followed by the end-of-document token (--eos_token, a special token of the
vocabulary); the last documents (about --eval_fraction of the tokens, at least one document
when there are two) are held out. Written to --output (see `data.prepared`): train.bin,
eval.bin (uint16 when the vocabulary fits, else uint32), tokenizer.json, meta.json.

Everything is written to a temporary sibling directory and renamed into place at the end,
so an error or Ctrl-C leaves nothing half-written; an --output that exists and is not empty
is refused.
"""

import os
import shutil
import sys
import tempfile

import numpy as np

from data import documents, prepared
from errors import ArgumentParser, ConfigError, DataError, run_cli

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte tokens and the end-of-document token
ENCODE_BATCH = 256  # documents per `encode_batch` call (Rust threads within a batch)
PIECE_CHARS = 1 << 20  # longer documents are encoded in pieces cut at line ends


def dtype_for(vocab_size: int, requested: str = "auto") -> str:
    """uint16 when every id fits (vocab <= 65,536), else uint32; a requested dtype that
    cannot hold the vocabulary is a ConfigError."""
    fits16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return "uint16" if fits16 else "uint32"
    if requested == "uint16" and not fits16:
        raise ConfigError(f"--dtype: uint16 cannot hold a vocabulary of {vocab_size} ids")
    return requested


def train_tokenizer(texts, vocab_size: int, eos_token: str):
    """A byte-level BPE of `vocab_size` ids (the corpus may give fewer) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"--vocab_size: must be >= {MIN_BPE_VOCAB} (256 bytes + eos)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(file: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json (DataError naming the file if not)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(file)
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{file}: not a loadable tokenizer.json ({reason})") from None


def eos_id(tokenizer, eos_token: str, where: str) -> int:
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise ConfigError(f"--eos_token: {eos_token!r} is not in the vocabulary of {where}")
    return token_id


def pieces(document: str) -> list[str]:
    """`document` cut after line ends into pieces of about PIECE_CHARS, so a book-sized file
    is not one giant string for the tokenizer. A cut is a pre-tokenization boundary only:
    byte-level BPE still encodes every byte, so decoding is unchanged."""
    if len(document) <= PIECE_CHARS:
        return [document]
    out, start = [], 0
    while start < len(document):
        stop = document.find("\n", start + PIECE_CHARS)
        stop = len(document) if stop < 0 else stop + 1
        out.append(document[start:stop])
        start = stop
    return out


class TokenWriter:
    """Appends each document's ids and eos to one raw file; remembers where documents end
    and how many UTF-8 bytes each held."""

    def __init__(self, file: str, dtype: str, eos: int):
        self.handle = open(file, "wb")
        self.dtype, self.eos = np.dtype(dtype), eos
        self.document_ends, self.document_bytes = [], []
        self.count = 0

    def add(self, encodings) -> None:
        """One document: the ids of its pieces' encodings, then eos."""
        ids = [np.asarray(encoding.ids, self.dtype) for encoding in encodings]
        tokens = np.concatenate(ids + [np.asarray([self.eos], self.dtype)])
        tokens.tofile(self.handle)
        self.count += len(tokens)

    def end_document(self, text_bytes: int) -> None:
        self.document_ends.append(self.count)
        self.document_bytes.append(text_bytes)

    def close(self) -> None:
        self.handle.close()


def encode_corpus(tokenizer, texts, writer: TokenWriter, progress) -> None:
    """Encodes documents a batch at a time (the tokenizer's Rust threads share a batch)."""
    batch = []

    def flush():
        document_pieces = [pieces(text) for text in batch]
        flat = [piece for parts in document_pieces for piece in parts]
        encodings = iter(tokenizer.encode_batch(flat, add_special_tokens=False))
        for text, parts in zip(batch, document_pieces):
            writer.add([next(encodings) for _ in parts])
            size = len(text.encode("utf-8"))
            writer.end_document(size)
            progress.update(size)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()


def split_point(document_ends: list[int], eval_fraction: float) -> int:
    """The number of leading documents kept for training: the held-out tail is the fewest
    last documents with >= eval_fraction of the tokens, and at least one document is left
    on each side (a single document is cut at the token position instead: see split_tokens)."""
    total = document_ends[-1]
    wanted = total * (1.0 - eval_fraction)
    kept = int(np.searchsorted(document_ends, wanted, side="right"))
    return min(max(kept, 1), len(document_ends) - 1)


def write_splits(all_file: str, out_dir: str, writer: TokenWriter, eval_fraction: float):
    """train.bin / eval.bin from the one file of all tokens -> per-split counts."""
    ends, sizes = writer.document_ends, writer.document_bytes
    tokens = np.memmap(all_file, dtype=writer.dtype, mode="r")
    if len(ends) >= 2:
        kept = split_point(ends, eval_fraction)
        cut = ends[kept - 1]
        counts = dict(
            train_documents=kept,
            eval_documents=len(ends) - kept,
            train_bytes=sum(sizes[:kept]),
            eval_bytes=sum(sizes[kept:]),
        )
    else:  # one document: hold out its tail by tokens (its bytes shared in proportion)
        cut = min(max(int(round(len(tokens) * (1.0 - eval_fraction))), 1), len(tokens) - 1)
        train_share = cut / len(tokens)
        counts = dict(
            train_documents=1,
            eval_documents=1,
            train_bytes=round(sizes[0] * train_share),
            eval_bytes=sizes[0] - round(sizes[0] * train_share),
        )
    for name, part in ((prepared.TRAIN_FILE, tokens[:cut]), (prepared.EVAL_FILE, tokens[cut:])):
        np.asarray(part).tofile(os.path.join(out_dir, name))
    total = len(tokens)
    del tokens
    os.remove(all_file)
    return dict(train_tokens=int(cut), eval_tokens=int(total - cut), **counts)


def check_output(output: str) -> None:
    """An --output that exists must be an empty directory (nothing is ever overwritten)."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise DataError(f"{output}: --output exists and is not an empty directory")


def prepare(
    input_path: str,
    output: str,
    *,
    vocab_size: int = 0,
    tokenizer_file: str = "",
    text_field: str = "text",
    eos_token: str = EOS_TOKEN,
    eval_fraction: float = 0.01,
    dtype: str = "auto",
    show_progress: bool | None = None,
) -> prepared.Meta:
    """Tokenizes `input_path` into `output` (module docstring) and returns its Meta."""
    from tqdm import tqdm

    if bool(vocab_size) == bool(tokenizer_file):
        raise ConfigError("give exactly one of --vocab_size (train a BPE) or --tokenizer=FILE")
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"--eval_fraction: must be in (0, 1), got {eval_fraction}")
    if dtype not in ("auto", "uint16", "uint32"):
        raise ConfigError(f"--dtype: {dtype!r} (choose auto, uint16, uint32)")
    output = os.path.abspath(os.path.expanduser(output))
    check_output(output)
    files = documents.input_files(input_path)
    if tokenizer_file:
        tokenizer = load_tokenizer(tokenizer_file)
        origin = os.path.abspath(tokenizer_file)
    else:
        texts = (
            piece for text in documents.read_documents(files, text_field) for piece in pieces(text)
        )
        tokenizer = train_tokenizer(texts, vocab_size, eos_token)
        origin = f"byte-level BPE trained here on --input (asked for {vocab_size} ids)"
    eos = eos_id(tokenizer, eos_token, tokenizer_file or "the trained tokenizer")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    token_dtype = dtype_for(vocab, dtype)

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the corpus private
    try:
        all_file = os.path.join(staging, "all.bin")
        writer = TokenWriter(all_file, token_dtype, eos)
        with tqdm(
            total=documents.expected_bytes(files),
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=None if show_progress is None else not show_progress,
        ) as progress:
            try:
                encode_corpus(
                    tokenizer, documents.read_documents(files, text_field), writer, progress
                )
            finally:
                writer.close()
        if not writer.document_ends:
            raise DataError(f"{input_path}: --input holds no text ({len(files)} files)")
        if writer.count < 2:
            raise DataError(f"{input_path}: --input is one token long, too short to split")
        counts = write_splits(all_file, staging, writer, eval_fraction)
        tokenizer.save(os.path.join(staging, prepared.TOKENIZER_FILE))
        meta = prepared.Meta(
            vocab_size=vocab,
            eos_id=eos,
            dtype=token_dtype,
            source=os.path.abspath(input_path),
            tokenizer=origin,
            **counts,
        )
        with open(os.path.join(staging, prepared.META_FILE), "w") as handle:
            handle.write(meta.to_json())
        check_output(output)  # nothing appeared there meanwhile
        if os.path.isdir(output):
            os.rmdir(output)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="text file, directory, .jsonl, .parquet")
    parser.add_argument("--output", required=True, help="a new (or empty) directory")
    parser.add_argument("--vocab_size", type=int, default=0, help="train a byte-level BPE")
    parser.add_argument("--tokenizer", default="", help="or use this tokenizer.json")
    parser.add_argument("--text_field", default="text", help=".jsonl / .parquet text field")
    parser.add_argument("--eos_token", default=EOS_TOKEN)
    parser.add_argument("--eval_fraction", type=float, default=0.01)
    parser.add_argument("--dtype", default="auto", help="auto, uint16 or uint32")
    args = parser.parse_args(argv)
    meta = prepare(
        args.input,
        args.output,
        vocab_size=args.vocab_size,
        tokenizer_file=args.tokenizer,
        text_field=args.text_field,
        eos_token=args.eos_token,
        eval_fraction=args.eval_fraction,
        dtype=args.dtype,
    )
    print(
        f"{args.output}: {meta.train_tokens:,} training tokens ({meta.train_documents:,} "
        f"documents), {meta.eval_tokens:,} held out ({meta.eval_documents:,}); vocabulary "
        f"{meta.vocab_size:,}, eos id {meta.eos_id}, {meta.dtype}"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
