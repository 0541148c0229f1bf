"""The deep memory's per-token inputs as one record, and the inputs a choice may declare.

Every form of the recurrence -- `reference`, `chunked`, the kernels -- takes one
`MemoryInputs`; the layer (`layers.neural_memory`) produces it. A Miras choice that needs a
per-token input of its own (Yaad's Huber threshold delta_t, ATLAS's Omega gates gamma_t)
declares it as a `TokenInput`, and the record carries it in `extra` under that name, so no
signature between the layer and the recurrence names it: the checks, the chunk padding,
the Omega window and the decoding cache all read the declaration. A new choice with its own
input is its function and table entry (`choices.py` / `choices_miras.py`) and the layer's
projection for it (`layers.neural_memory.EXTRA_INPUTS`).

Layouts: [B, T, H, D] / [B, T, H] at the public API, heads-major [B, H, T, ...] inside the
chunked form, one token [B, H, ...] in the token rule.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class TokenInput:
    """A per-token, per-head scalar input ([B, T, H]) that a choice declares.

    pad: its value at the padded tokens of a partial last chunk (finite; no real token reads
      it, as every chunk coefficient is causal). empty: its value in the Omega window's slots
      before the sequence starts (their gate is 0, so any finite value does). required: a
      call must pass it (otherwise absent means the choice's default).
    """

    name: str
    pad: float
    empty: float
    required: bool = True


# Padding of the core inputs in a partial chunk: zero q / k / v / theta / g, and eta = 1
# (eta = 0 would wipe the momentum; with momentum no padded token can be made neutral, so
# the last chunk is read at its last real token instead, see `chunked`).
CORE_PADS = {"q": 0.0, "k": 0.0, "v": 0.0, "lr": 0.0, "momentum": 1.0, "log_decay": 0.0}
CORE_NAMES = tuple(CORE_PADS)


@dataclasses.dataclass(frozen=True)
class MemoryInputs:
    """q, k [.., Dk]; v [.., Dv]; lr (theta_t > 0), momentum (eta_t; None for the GD rule),
    log_decay (g_t <= 0; None: no forgetting) and `extra` {name: per-token scalar} for the
    inputs the spec declares (`MemorySpec.extra_inputs`). A pytree: under `jax.grad` /
    `lax.scan` it behaves as its arrays (None and absent extras are empty subtrees)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr: jax.Array
    momentum: jax.Array | None = None
    log_decay: jax.Array | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def named(self) -> dict:
        """Every present array by name (extras under their own names)."""
        core = {name: getattr(self, name) for name in CORE_NAMES}
        return {name: x for name, x in {**core, **self.extra}.items() if x is not None}

    def map(self, function) -> "MemoryInputs":
        """function(name, array) applied to every present array."""
        return from_named({name: function(name, x) for name, x in self.named().items()})

    def replace(self, **changes) -> "MemoryInputs":
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(MemoryInputs, data_fields=[*CORE_NAMES, "extra"], meta_fields=[])


def from_named(named: dict) -> MemoryInputs:
    """The record from {name: array}: core names to their fields, the rest into `extra`."""
    core = {name: named.get(name) for name in CORE_NAMES}
    extra = {name: x for name, x in named.items() if name not in CORE_PADS}
    return MemoryInputs(**core, extra=extra)


def pad_values(declared) -> dict:
    """{name: padding value} for the core inputs and the `declared` TokenInputs."""
    return {**CORE_PADS, **{item.name: item.pad for item in declared}}


def check_extras(declared, extra: dict, where: str):
    """The extras must be exactly the declared inputs (the optional ones may be absent)."""
    names = {item.name for item in declared}
    unknown = sorted(set(extra) - names)
    if unknown:
        raise ValueError(f"{where}: inputs {unknown} are not declared by the spec (it takes "
                         f"{sorted(names) or 'none'})")  # fmt: skip
    missing = [item.name for item in declared if item.required and item.name not in extra]
    if missing:
        raise ValueError(f"{where}: the spec needs the per-token inputs {missing}; got none")
