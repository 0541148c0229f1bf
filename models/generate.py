"""Autoregressive sampling from a `LanguageModel` with per-block decoding caches.

`generate` prefills the prompt with one `model.extend`, then runs single-token extends in a
`jax.lax.scan`, all under one `jax.jit`. `sample_logits` turns next-token logits into tokens:
greedy (argmax), or a draw from softmax(logits / temperature) after optional top-k
(Fan et al. 2018) and top-p / nucleus (Holtzman et al. 2020) filtering, in that order (the
order of Hugging Face's samplers, so settings mean the same there and here).
"""

import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from errors import ConfigError


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
    _check_sampling_args(temperature, top_k, top_p, greedy)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ConfigError(f"prompt: expected int tokens [batch, length >= 1], got {prompt.shape}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be an int >= 0, got {max_new_tokens!r}")
    prompt = jnp.asarray(prompt, jnp.int32)
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
