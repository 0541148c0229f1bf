"""Logical axis names on parameters.

Every parameter is annotated with *logical* axis names (``"embed"``, ``"mlp"``, ...).
``training.sharding`` maps them to mesh axes through the rules table in the config, so
pure data parallel and FSDP differ by config only. Annotations are metadata only:
``eager_sharding=False`` keeps Flax from placing the value at construction time, because
a model is built before (and independently of) the mesh.

Logical names used across mnemax:
  vocab      vocabulary dimension (embedding rows, head columns)
  embed      the model (residual stream) dimension
  mlp        hidden dimension of feed-forward layers
  qkv        flattened heads x head_dim of attention / memory projections
  heads      a leading axis that stacks independent per-head matrices
  layers     a leading axis that stacks per-layer weights
  experts    a leading axis that stacks independent memories / experts
  conv       short convolution taps
  norm       normalisation scales
  memory_state  the deep memories' initial weights (trained by AdamW, no weight decay)
  persistent    Titans' persistent tokens (AdamW)
Optimizers treat leading 'heads' / 'layers' / 'experts' axes as a stack of matrices.
"""

from flax import nnx

STACK_AXES = ("layers", "heads", "experts")


def with_logical_axes(initializer, *names: str | None):
    """Wrap a Flax initializer so the parameter it creates carries logical axis names."""
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)


def projection(features_in, features_out, *, std, axes, rngs, dtype=None, bias=None):
    """nnx.Linear with N(0, std^2) weights carrying the logical axes `axes` (in, out), and
    no bias unless `bias` gives its constant initial value (axis `axes[-1]`); matmuls run in
    `dtype` (None: the input's), parameters are float32."""
    return nnx.Linear(
        features_in,
        features_out,
        use_bias=bias is not None,
        dtype=dtype,
        kernel_init=with_logical_axes(nnx.initializers.normal(std), *axes),
        bias_init=with_logical_axes(nnx.initializers.constant(bias or 0.0), axes[-1]),
        rngs=rngs,
    )
