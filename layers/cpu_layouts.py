"""A workaround for one of XLA:CPU's layout choices in the backward of a projection.

For y = x W followed by elementwise work (a short convolution, an output gate),
the weight gradient is dW = x^T dy. XLA:CPU's layout assignment treats the fusion that
computes dy as free to emit any layout and asks it for dy^T, so the elementwise backward
(for the short convolution: four shifted reads of the cotangent) runs inside a loop that
writes the transpose element by element, striding through its inputs a whole row at a
time. On one core, for 2 x 1024 tokens and 256 channels, that fusion took 7-30 ms where a
plain transpose of the same array takes 0.4 ms; three projections each followed by a short
convolution took 92 ms forward + backward, 42 ms with this workaround. Whole training
steps: `benchmarks/results/cpu_layouts.md`.

`materialised_cotangent(y)` is the identity whose backward hands the cotangent on through
a conditional whose predicate is data, on CPU only: XLA does not fuse across a conditional,
so dy is computed once, in its natural layout, and only then transposed (a plain copy).
The values are bit-identical. On other platforms (GPU, TPU) `lax.platform_dependent` picks
the plain identity, a switch on a constant that their compilers resolve. Used after the
projections in front of `short_conv` and `gated_output`'s gate (outside any vmap: under
vmap the conditional becomes a select that XLA fuses through, so Mixture-of-Memories applies
it to its stacked projection, not per memory); not in `mlp.SwiGLU`: the
Transformer's step was no faster with it there (0.92x / 0.95x, tiny / small, in a run whose
control shows the same 0.90x / 0.97x without it).
"""

import contextlib

import jax
import jax.numpy as jnp

_enabled = True


@contextlib.contextmanager
def disabled():
    """Trace without the workaround inside this block (`benchmarks.cpu_layouts` times both)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _through_conditional(cotangent):
    """The cotangent unchanged, as the output of a conditional XLA cannot see through."""
    is_finite = jnp.isfinite(cotangent.reshape(-1)[0])  # data, so never folded away
    # Two different (if equal-valued) branches: jax drops a cond whose branches are the same.
    return jax.lax.cond(is_finite, lambda g: g, jnp.copy, cotangent)


def materialised_cotangent(x):
    """Identity; on CPU the backward materialises x's cotangent in its own layout."""
    return _materialised_cotangent(x) if _enabled else x


@jax.custom_vjp
def _materialised_cotangent(x):
    return x


def _forward(x):
    return x, None


def _backward(_, cotangent):
    return (jax.lax.platform_dependent(cotangent, cpu=_through_conditional, default=lambda g: g),)


_materialised_cotangent.defvjp(_forward, _backward)
