"""SlimAdam's calibration run: measure which axes of Adam's second moment can be shared.

With `optim.slimadam.rules = "snr"` the trainer takes `calibration_steps` gradients at the
initial parameters, on batches from a stream separate from training (so calibration does
not change which batches training sees, and a resumed run measures the same thing), and
hands them to `optim.slimadam.calibrate_axes` (Kalra et al. 2025, SNR of the second moment).
"""

import jax

import data as data_lib
from optim import slimadam
from training import sharding as sharding_lib
from training.state import ModelSpec, init_params
from training.step import model_terms


def needs_calibration(optim_config) -> bool:
    return optim_config.name == "slimadam" and optim_config.slimadam.rules == "snr"


def slimadam_axes(config, spec: ModelSpec, mesh) -> dict:
    """Path string -> axes to average SlimAdam's second moment over (None: keep it full)."""
    replicated = sharding_lib.replicated(mesh)
    params = jax.jit(lambda: init_params(config.model, config.seed), out_shardings=replicated)()

    def loss(params, batch):
        terms = model_terms(spec, params, batch)
        return terms["ce_sum"] / terms["count"] + terms["aux_loss"]

    # Replicated gradients: every process can read them whole.
    grad_fn = jax.jit(jax.grad(loss), out_shardings=replicated)
    batches = data_lib.build_train_iterator(
        config.data,
        seed=config.seed + 1,
        global_batch_size=config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def gradients():
        for _ in range(config.optim.slimadam.calibration_steps):
            yield grad_fn(params, sharding_lib.global_batch(next(batches), mesh))

    return slimadam.calibrate_axes(
        gradients(),
        spec.logical_specs,
        b2=config.optim.b2,
        snr_cutoff=config.optim.slimadam.snr_cutoff,
    )
