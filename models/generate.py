"""Autoregressive sampling from a `LanguageModel` with per-block decoding caches.

`generate` prefills the prompt with one `model.extend`, then runs single-token extends in a
`jax.lax.scan`, all under one `jax.jit`. `stream` yields the same tokens one at a time (a
jitted prefill, then one jitted step per token), for printing as they come. From the
command line, on a workdir written by train.py (the newest readable checkpoint):

    python -m models.generate --workdir=runs/default --prompt="def main(" --max_new_tokens=200
    python -m models.generate --workdir=runs/mqar --prompt_tokens=5,17,9 --greedy

Text runs (data.name=text) are byte-level: the prompt is its UTF-8 bytes (empty: the
document separator byte 0). Token runs on a `python -m data.prepare` directory encode the
prompt with its tokenizer.json (empty: the end-of-document token, i.e. a new document) and
decode the continuation as it streams; `--tokenizer=FILE` names another tokenizer.json.
Other runs take --prompt_tokens and print token ids.

`sample_logits` turns next-token logits into tokens: greedy (argmax), or a draw from
softmax(logits / temperature) after optional top-k (Fan et al. 2018) and top-p / nucleus
(Holtzman et al. 2020) filtering, in that order (the order of Hugging Face's samplers, so
settings mean the same there and here).
"""

import codecs
import functools
import numbers
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from data import config as data_config
from data.text import DOCUMENT_SEPARATOR
from errors import ArgumentParser, ConfigError, DataError, run_cli
from models.restore import restore


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """The most likely token, int32 [...] from logits [..., V]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
    """logits / temperature: < 1 sharpens the distribution (-> argmax as it goes to 0)."""
    return logits / temperature


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the `top_k` largest logits, set the rest to -inf (0 or >= V: keep all).

    Logits tied with the k-th largest are kept too, so more than k tokens survive only on
    exact ties.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020, eq. 2): keep the smallest set of most likely
    tokens whose probability mass is >= top_p, set the rest to -inf (top_p >= 1: keep all).

    A token is kept when the mass of the tokens more likely than it is still < top_p, so the
    most likely token is always kept. `top_p` may be a traced scalar.
    """
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probabilities = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probabilities, axis=-1)
    mass_before = jnp.concatenate(
        [jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1
    )
    kept_sorted = mass_before < top_p
    smallest_kept = jnp.min(jnp.where(kept_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(logits >= smallest_kept, logits, -jnp.inf)
    # At top_p = 1 rounding in the cumulative sum could drop the tail; keep all exactly.
    return jnp.where(top_p >= 1.0, logits, filtered)


def _check_sampling_args(temperature, top_k, top_p, greedy) -> None:
    """Range checks on Python-number settings (traced values are the caller's business)."""
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ConfigError(f"top_k: must be an int >= 0 (0 = off), got {top_k!r}")
    if greedy:
        return
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ConfigError(f"temperature: must be > 0 (or use greedy=True), got {temperature}")
    if isinstance(top_p, numbers.Real) and not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] (1 = off), got {top_p}")


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature=1.0,
    top_k: int = 0,
    top_p=1.0,
    greedy: bool = False,
) -> jax.Array:
    """Tokens int32 [...] from logits [..., V]: argmax if `greedy`, else a draw from
    softmax(logits / temperature) restricted by top-k (0 = off), then top-p (1 = off).

    temperature and top_p may be traced scalars; top_k and greedy are static.
    """
    _check_sampling_args(temperature, top_k, top_p, greedy)
    if greedy:
        return greedy_tokens(logits)
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _checked_prompt(prompt, max_new_tokens, temperature, top_k, top_p, greedy):
    _check_sampling_args(temperature, top_k, top_p, greedy)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ConfigError(f"prompt: expected int tokens [batch, length >= 1], got {prompt.shape}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be an int >= 0, got {max_new_tokens!r}")
    return jnp.asarray(prompt, jnp.int32)


def generate(
    model: nnx.Module,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """Continue `prompt` [B, T] int32 by `max_new_tokens` sampled tokens -> [B, T + new].

    Every row's prompt has the same length T (no padding; left-pad-free batching only).
    The model needs `init_cache` / `extend` (see `models.lm.LanguageModel`); its cache holds
    T + max_new_tokens positions. Sampling is as in `sample_logits`; one key of `rng` is
    used per new token, so a run is reproducible from `rng`. Compiled once per
    (model structure, shapes, max_new_tokens, top_k, greedy); temperature and top_p are
    traced and do not recompile.
    """
    prompt = _checked_prompt(prompt, max_new_tokens, temperature, top_k, top_p, greedy)
    if max_new_tokens == 0:
        return prompt
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt,
        rng,
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens),
        top_k=int(top_k),
        greedy=bool(greedy),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy"))
def _generate(graphdef, state, prompt, rng, temperature, top_p, *, max_new_tokens, top_k, greedy):
    model = nnx.merge(graphdef, state)
    batch_size, prompt_length = prompt.shape
    sample = functools.partial(
        sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    keys = jax.random.split(rng, max_new_tokens)

    cache = model.init_cache(batch_size, prompt_length + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(prompt_length, dtype=jnp.int32), prompt.shape)
    logits, cache = model.extend(prompt, cache, positions=positions)
    first_token = sample(logits[:, -1], keys[0])

    def decode_step(carry, step_inputs):
        token, cache = carry
        position, key = step_inputs
        positions = jnp.full((batch_size, 1), position, jnp.int32)
        logits, cache = model.extend(token[:, None], cache, positions=positions)
        next_token = sample(logits[:, 0], key)
        return (next_token, cache), next_token

    # The last sampled token is never fed back, so max_new_tokens - 1 steps suffice.
    step_positions = jnp.arange(prompt_length, prompt_length + max_new_tokens - 1)
    _, later_tokens = jax.lax.scan(
        decode_step, (first_token, cache), (step_positions.astype(jnp.int32), keys[1:])
    )
    return jnp.concatenate([prompt, first_token[:, None], later_tokens.T], axis=1)


def stream(
    model: nnx.Module,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
):
    """Yield the tokens `generate` would append, one [B] int32 array at a time (the same
    keys of `rng` for the same steps). Two compiles: the prefill and the one-token step."""
    prompt = _checked_prompt(prompt, max_new_tokens, temperature, top_k, top_p, greedy)
    if max_new_tokens == 0:
        return
    graphdef, state = nnx.split(model)
    batch_size, prompt_length = prompt.shape
    keys = jax.random.split(rng, max_new_tokens)
    settings = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
    static = dict(top_k=int(top_k), greedy=bool(greedy))
    cache = model.init_cache(batch_size, prompt_length + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(prompt_length, dtype=jnp.int32), prompt.shape)
    token, cache = _extend_and_sample(
        graphdef, state, prompt, cache, positions, keys[0], **settings, **static
    )
    yield token
    for step in range(1, max_new_tokens):
        positions = jnp.full((batch_size, 1), prompt_length + step - 1, jnp.int32)
        token, cache = _extend_and_sample(
            graphdef, state, token[:, None], cache, positions, keys[step], **settings, **static
        )
        yield token


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "greedy"))
def _extend_and_sample(graphdef, state, tokens, cache, positions, key, *, temperature, top_p,
                       top_k, greedy):  # fmt: skip
    """Extend the cache by `tokens` [B, T] and sample the token after the last one."""
    logits, cache = nnx.merge(graphdef, state).extend(tokens, cache, positions=positions)
    next_token = sample_logits(
        logits[:, -1], key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )
    return next_token, cache


# ---- the command line ---------------------------------------------------------------------


def run_tokenizer(config, tokenizer_file: str = ""):
    """The run's text tokenizer: "bytes" for byte-level text, a `tokenizers.Tokenizer` for
    token data from `python -m data.prepare` (its tokenizer.json, or `tokenizer_file`), or
    None (token ids in and out)."""
    from data import prepare, prepared

    if config.data.name == "text":
        return "bytes"
    if not tokenizer_file and config.data.name == "tokens" and config.data.path:
        candidate = os.path.join(os.path.expanduser(config.data.path), prepared.TOKENIZER_FILE)
        if prepared.is_prepared(config.data.path) and not os.path.isfile(candidate):
            raise DataError(f"{candidate}: missing (pass --tokenizer=FILE)")
        tokenizer_file = candidate if os.path.isfile(candidate) else ""
    return prepare.load_tokenizer(tokenizer_file) if tokenizer_file else None


def _prompt_tokens(args, config, tokenizer) -> list[int]:
    if args.prompt_tokens:
        try:
            tokens = [int(item) for item in args.prompt_tokens.split(",") if item.strip()]
        except ValueError:
            raise ConfigError(f"--prompt_tokens: expected comma-separated ints, got "
                              f"{args.prompt_tokens!r}") from None  # fmt: skip
    elif tokenizer == "bytes":
        # An empty prompt starts a document: byte-level text joins documents with a separator.
        tokens = list(args.prompt.encode("utf-8")) or list(DOCUMENT_SEPARATOR)
    elif tokenizer is not None:
        # An empty prompt starts a document too: the eos that ends every prepared document.
        tokens = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        tokens = tokens or [data_config.eos_id(config.data)]
    else:
        raise ConfigError(
            f"--prompt_tokens: data.name={config.data.name!r} has no tokenizer here (byte "
            "text and data.prepare's token directories do); give the prompt as token ids"
        )
    vocab_size = config.model.vocab_size
    if not tokens or not all(0 <= token < vocab_size for token in tokens):
        raise ConfigError(f"--prompt_tokens: ids must be in [0, {vocab_size}), got {tokens}")
    return tokens


class TextStream:
    """Turns streamed token ids into the text they add, holding back an unfinished UTF-8
    character (a byte-level token may end inside one) until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids, self.shown = [], ""
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        if self.tokenizer == "bytes":
            return self.bytes.decode(bytes([token]))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # wait for the rest of the character
            return ""
        new, self.shown = text[len(self.shown) :], text
        return new

    def finish(self) -> str:
        if self.tokenizer == "bytes":
            return self.bytes.decode(b"", final=True)
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)[len(self.shown) :]


def main(argv=None) -> None:
    parser = ArgumentParser(
        prog="python -m models.generate", description="Sample from a trained workdir."
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", default="", help="text (byte text or a data.prepare run)")
    parser.add_argument("--prompt_tokens", default="", help="comma-separated token ids")
    parser.add_argument("--tokenizer", default="", help="default: the run's data tokenizer")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1: off")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="default: the newest")
    args = parser.parse_args(argv)
    restored = restore(args.workdir, args.step)
    tokenizer = run_tokenizer(restored.config, args.tokenizer)
    prompt = jnp.asarray([_prompt_tokens(args, restored.config, tokenizer)], jnp.int32)
    tokens = stream(
        restored.model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
    )
    if tokenizer is None:
        for token in tokens:
            print(int(token[0]), end=" ", flush=True)
        print()
        return
    text = TextStream(tokenizer)
    if args.prompt or args.prompt_tokens:  # not the implicit document start of an empty prompt
        sys.stdout.write("".join(text.add(int(token)) for token in prompt[0]))
    for token in tokens:
        sys.stdout.write(text.add(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(text.finish() + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
