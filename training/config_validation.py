"""Check a resolved config before anything is compiled.

The schema is `configs.base.get_config()`: a key it does not have is a typo, and a value
whose type differs from the schema's default is a mistake. Every failure is one
`ConfigError` line that names the key.
"""

import difflib
import json

import ml_collections

import data as data_lib
import optim
from errors import ConfigError
from models import registry

# Keys whose change does not make a workdir a different run (resume may extend or re-log).
RESUMABLE_CHANGES = ("train.num_steps", "log", "eval", "checkpoint", "mesh")


def _type_ok(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list) and all(
            not default or isinstance(item, type(default[0])) for item in value
        )
    if default is None:
        return True
    return isinstance(value, type(default))


def check_schema(config, schema, prefix: str = "") -> None:
    """Unknown keys and wrong types, recursively."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{path}: unknown config key{hint}")
        default = schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{path}: must be a section, got {type(value).__name__}")
            check_schema(value, default, prefix=f"{path}.")
        elif not _type_ok(default, value):
            raise ConfigError(
                f"{path}: expected {type(default).__name__}, got {type(value).__name__} ({value!r})"
            )


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_values(config) -> None:
    """Impossible values that the types alone do not catch."""
    train = config.train
    _require(train.num_steps > 0, "train.num_steps", f"must be > 0, got {train.num_steps}")
    _require(train.batch_size > 0, "train.batch_size", f"must be > 0, got {train.batch_size}")
    accum = train.grad_accum_steps
    _require(accum >= 1, "train.grad_accum_steps", f"must be >= 1, got {accum}")
    _require(
        train.batch_size % accum == 0,
        "train.batch_size",
        f"{train.batch_size} is not divisible by train.grad_accum_steps={accum}",
    )
    _require(
        train.nonfinite in ("stop", "skip"),
        "train.nonfinite",
        f"must be 'stop' or 'skip', got {train.nonfinite!r}",
    )
    _require(config.data.seq_len > 0, "data.seq_len", f"must be > 0, got {config.data.seq_len}")
    for key in ("log.every_steps", "checkpoint.every_steps", "checkpoint.keep"):
        section, name = key.split(".")
        value = config[section][name]
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(config.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 disables)")
    _require(config.eval.num_batches > 0, "eval.num_batches", "must be > 0")
    check_eval(config.eval)

    data_lib.validate(config.data)
    check_model(config.model, seq_len=config.data.seq_len)
    data_vocab = data_lib.vocab_size(config.data)
    _require(
        config.model.vocab_size >= data_vocab,
        "model.vocab_size",
        f"{config.model.vocab_size} is smaller than the data's vocabulary ({data_vocab})",
    )
    _require(
        config.optim.name in optim.OPTIMIZER_NAMES,
        "optim.name",
        f"unknown optimizer {config.optim.name!r} (choose {', '.join(optim.OPTIMIZER_NAMES)})",
    )


RECALL_TASKS = ("mqar", "niah")  # evals.recall.TASKS (not imported: evals imports training)


def check_eval(eval_config) -> None:
    """The recall and memory-behaviour hooks' keys (see configs/base.py)."""
    for key in ("recall_every_steps", "memory_every_steps"):
        _require(eval_config[key] >= 0, f"eval.{key}", "must be >= 0 (0 disables)")
    examples = eval_config.recall_num_examples
    _require(examples > 0, "eval.recall_num_examples", f"must be > 0, got {examples}")
    for task in eval_config.recall_tasks:
        _require(
            task in RECALL_TASKS,
            "eval.recall_tasks",
            f"unknown task {task!r} (choose from {', '.join(RECALL_TASKS)})",
        )
    for key in ("recall_length_multiples", "mqar_num_kv_pairs"):
        values = tuple(eval_config[key])
        _require(all(v >= 1 for v in values), f"eval.{key}", f"must be >= 1, got {values}")
    _require(len(eval_config.recall_length_multiples) > 0, "eval.recall_length_multiples", "empty")
    depths = tuple(eval_config.niah_depths)
    _require(
        len(depths) > 0 and all(0.0 <= d <= 1.0 for d in depths),
        "eval.niah_depths",
        f"must be depths in [0, 1], got {depths}",
    )


def check_model(model_config, *, seq_len: int) -> None:
    """Names that must be registered, and sizes that must divide the sequence."""
    models = registry.registered_models()
    _require(
        model_config.name in models,
        "model.name",
        f"unknown model {model_config.name!r} (registered: {', '.join(models)})",
    )
    blocks = registry.registered_blocks()
    for layer, kind in enumerate(model_config.block_pattern):
        _require(
            kind in blocks,
            "model.block_pattern",
            f"unknown block kind {kind!r} at position {layer} (registered: {', '.join(blocks)})",
        )
    _require(len(model_config.block_pattern) > 0, "model.block_pattern", "must not be empty")
    chunk = model_config.loss_chunk_size
    _require(
        chunk >= 0 and (chunk == 0 or seq_len % chunk == 0),
        "model.loss_chunk_size",
        f"{chunk} does not divide data.seq_len={seq_len} (0 disables chunking)",
    )


def resolve(config) -> ml_collections.ConfigDict:
    """Fill derived values: `model.vocab_size = 0` means "the data's vocabulary"."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.vocab_size == 0:
        config.model.vocab_size = data_lib.vocab_size(config.data)
    return config


def validate(config, schema) -> ml_collections.ConfigDict:
    """Schema check, resolution of derived values, value checks; returns the resolved copy."""
    check_schema(config, schema)
    resolved = resolve(config)
    check_values(resolved)
    return resolved


def to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def run_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Keys that differ between two configs, ignoring those a resume may change.

    With `defaults` (the code's default config), a key the saved config lacks -- an option
    added since that run was written -- is no difference while its current value is the
    default: a new option's default keeps what the code computed before, so an older workdir
    still resumes after the codebase grows an option."""

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    old, new = dict(flatten(saved)), dict(flatten(current))

    def resumable(key):
        return any(key == p or key.startswith(p + ".") for p in RESUMABLE_CHANGES)

    known = dict(flatten(defaults or {}))

    def added_at_default(key):
        return key not in old and key in known and new.get(key) == known[key]

    keys = sorted(set(old) | set(new))
    return [
        key
        for key in keys
        if not resumable(key) and not added_at_default(key) and old.get(key) != new.get(key)
    ]
