"""The `data` config section: defaults, validation, and the vocabulary size it implies."""

import ml_collections

from data import prepared
from errors import ConfigError

DATASET_NAMES = ("text", "tokens", "mqar")
TOKEN_DTYPES = ("uint16", "uint32")
TEXT_VOCAB_SIZE = 256  # byte-level text: one token per byte value


def default_config() -> ml_collections.ConfigDict:
    """Defaults of the `data` section. Keys and types are fixed; the run validator relies on it.

    name:             "text" (bytes of local files), "tokens" (pre-tokenized .bin/.npy), "mqar".
    seq_len:          tokens per training sequence (inputs and targets are both this long).
    path:             text: a file or a directory (recursive, sorted, hidden entries skipped);
                      "" = the running interpreter's standard library `*.py` files.
                      tokens: a `.bin`/`.npy` file or a directory of them, or a directory
                      `python -m data.prepare` wrote (meta.json: vocab_size, token_dtype,
                      eos_id and the train/eval split come from it). Unused by mqar.
    eval_path:        held-out data of the same kind; "" = hold out the tail of `path`.
    eval_fraction:    share of the corpus held out when `eval_path` is "" (at least one window).
    token_dtype:      element type of raw `.bin` token files (nanoGPT writes uint16).
    vocab_size:       tokens: must be set (every token must be < it), or 0 for a prepared
                      directory (meta.json's). text: 0 or 256.
                      mqar: 0 or equal to mqar.vocab_size.
    eos_id:           tokens: the end-of-document token; -1 = meta.json's (prepared data) or
                      none (raw files: then there are no document boundaries).
    document_resets:  tokens with an eos: each window carries `segment_ids`, a new segment
                      starting at every eos input token, so memory blocks reset and
                      positions restart between documents (packed documents). False: eos is
                      an ordinary token and state flows across documents.
    max_bytes:        text only: read at most this many bytes of `path` (and of `eval_path`);
                      0 = no cap.
    num_threads:      threads that assemble batches ahead of the training step (0 = inline).
    prefetch_batches: batches assembled ahead of time (0 = no prefetch).
    mqar:             multi-query associative recall (Zoology, Arora et al. 2023):
      vocab_size:         keys from [1, V/2), values from [V/2, V).
      num_kv_pairs:       key-value pairs at the start of each sequence.
      num_queries:        pairs queried later in the sequence; 0 = all pairs (as in Zoology).
      power_a:            Zoology's power law for query placement: gap index g-1 has
                          p ∝ a·g^(a-1), g = 1..space (1.0 = uniform, small a = close to the
                          context).
      random_non_queries: fill non-query positions with random tokens (Zoology) instead of 0.
    """
    config = ml_collections.ConfigDict()
    config.name = "text"
    config.seq_len = 256
    config.path = ""
    config.eval_path = ""
    config.eval_fraction = 0.01
    config.token_dtype = "uint16"
    config.vocab_size = 0
    config.eos_id = -1
    config.document_resets = True
    config.max_bytes = 1 << 25  # 32 MiB: read and joined in well under a second
    config.num_threads = 2
    config.prefetch_batches = 4
    config.mqar = ml_collections.ConfigDict()
    config.mqar.vocab_size = 8192
    config.mqar.num_kv_pairs = 8
    config.mqar.num_queries = 0
    config.mqar.power_a = 0.01
    config.mqar.random_non_queries = True
    return config


def _check_type(config, key: str, expected: type, prefix: str) -> None:
    value = config[key]
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected in (int, float):
        # bool is an int subclass, but a flag where a number is expected is a mistake.
        allowed = (int, float) if expected is float else (int,)
        ok = isinstance(value, allowed) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(
            f"{prefix}.{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
        )


def validate(config) -> None:
    """Raises ConfigError naming the first key of the `data` section that is unusable."""
    defaults = default_config()
    for section, reference, prefix in (
        (config, defaults, "data"),
        (config.mqar, defaults.mqar, "data.mqar"),
    ):
        for key in section.keys():
            if key not in reference:
                raise ConfigError(f"{prefix}.{key}: unknown key")
        for key in reference.keys():
            if key == "mqar":
                continue
            if key not in section:
                raise ConfigError(f"{prefix}.{key}: missing")
            _check_type(section, key, type(reference[key]), prefix)
    if config.name not in DATASET_NAMES:
        raise ConfigError(
            f"data.name: unknown dataset {config.name!r} (choose {', '.join(DATASET_NAMES)})"
        )
    if config.seq_len <= 0:
        raise ConfigError(f"data.seq_len: must be positive, got {config.seq_len}")
    if not 0.0 < config.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction: must be in (0, 1), got {config.eval_fraction}")
    if config.token_dtype not in TOKEN_DTYPES:
        raise ConfigError(
            f"data.token_dtype: {config.token_dtype!r} (choose {', '.join(TOKEN_DTYPES)})"
        )
    for key in ("max_bytes", "num_threads", "prefetch_batches", "vocab_size"):
        if config[key] < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {config[key]}")
    if config.eos_id < -1:
        raise ConfigError(
            f"data.eos_id: must be >= 0, or -1 (none / meta.json's), got {config.eos_id}"
        )
    if config.name == "tokens":
        _validate_tokens(config)
    if config.name == "text" and config.vocab_size not in (0, TEXT_VOCAB_SIZE):
        raise ConfigError(
            f"data.vocab_size: byte-level text has 256 tokens, got {config.vocab_size}"
        )
    if config.name == "mqar":
        _validate_mqar(config)


def _validate_tokens(config) -> None:
    if prepared.is_prepared(config.path):
        meta = prepared.read_meta(config.path)
        if config.vocab_size not in (0, meta.vocab_size):
            raise ConfigError(
                f"data.vocab_size: {config.vocab_size} disagrees with {config.path}/meta.json "
                f"({meta.vocab_size}); leave it 0 for prepared data"
            )
        return
    if config.vocab_size <= 0:
        raise ConfigError(
            "data.vocab_size: must be set (> 0) for data.name='tokens' (or point data.path "
            "at a directory python -m data.prepare wrote)"
        )
    if config.eos_id >= config.vocab_size:
        raise ConfigError(
            f"data.eos_id: {config.eos_id} is not < data.vocab_size {config.vocab_size}"
        )


def _validate_mqar(config) -> None:
    mqar = config.mqar
    if config.vocab_size not in (0, mqar.vocab_size):
        raise ConfigError(
            f"data.vocab_size: {config.vocab_size} disagrees with data.mqar.vocab_size "
            f"{mqar.vocab_size} (leave it 0 for mqar)"
        )
    if mqar.num_kv_pairs <= 0:
        raise ConfigError(f"data.mqar.num_kv_pairs: must be positive, got {mqar.num_kv_pairs}")
    # Keys come from [1, V/2) and values from [V/2, V), each drawn without replacement.
    if mqar.vocab_size // 2 - 1 < mqar.num_kv_pairs:
        raise ConfigError(
            f"data.mqar.vocab_size: {mqar.vocab_size} is too small for "
            f"{mqar.num_kv_pairs} distinct keys (need >= {2 * mqar.num_kv_pairs + 2})"
        )
    if not 0 <= mqar.num_queries <= mqar.num_kv_pairs:
        raise ConfigError(
            f"data.mqar.num_queries: must be in [0, num_kv_pairs={mqar.num_kv_pairs}], "
            f"got {mqar.num_queries}"
        )
    if mqar.power_a <= 0:
        raise ConfigError(f"data.mqar.power_a: must be positive, got {mqar.power_a}")
    num_queries = mqar.num_queries or mqar.num_kv_pairs
    # Queries sit on even offsets after the context, each followed by one filler token.
    needed = 2 * mqar.num_kv_pairs + 2 * num_queries
    if config.seq_len < needed:
        raise ConfigError(
            f"data.seq_len: {config.seq_len} is too short for {mqar.num_kv_pairs} kv pairs "
            f"and {num_queries} queries (need >= {needed})"
        )


def vocab_size(config) -> int:
    """Number of token ids the model must embed for this data section."""
    validate(config)
    if config.name == "text":
        return TEXT_VOCAB_SIZE
    if config.name == "mqar":
        return config.mqar.vocab_size
    if prepared.is_prepared(config.path):
        return prepared.read_meta(config.path).vocab_size
    return config.vocab_size


def token_dtype(config) -> str:
    """The dtype of raw token files: meta.json's for prepared data, else data.token_dtype."""
    if prepared.is_prepared(config.path):
        return prepared.read_meta(config.path).dtype
    return config.token_dtype


def eos_id(config) -> int | None:
    """The end-of-document token of token data: data.eos_id, else meta.json's, else None."""
    if config.eos_id >= 0:
        return config.eos_id
    if config.name == "tokens" and prepared.is_prepared(config.path):
        return prepared.read_meta(config.path).eos_id
    return None


def document_eos(config) -> int | None:
    """The eos id at which windows start a new segment, or None (no document resets)."""
    if config.name != "tokens" or not config.document_resets:
        return None
    return eos_id(config)
