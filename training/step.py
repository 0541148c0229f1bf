"""The jitted train and eval steps: pure functions of (state, batch).

The loss of a batch is `sum of masked cross-entropy / number of masked targets + aux
losses`, so gradient accumulation over micro-batches gives exactly the gradient of the
whole batch (each micro-batch's cross-entropy sum is divided by the *global* target count).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from training.state import ModelSpec, TrainState


def model_terms(spec: ModelSpec, params, batch):
    model = nnx.merge(spec.graphdef, params, spec.rest)
    return model.loss_terms(batch)


def _split_micro_batches(batch, num_micro: int):
    return jax.tree.map(
        lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch
    )


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation, schedule, train_config):
    num_micro = train_config.grad_accum_steps
    inject_at = train_config.get("inject_nonfinite_at_step", -1)

    def micro_loss(params, micro_batch, total_count):
        terms = model_terms(spec, params, micro_batch)
        loss = terms["ce_sum"] / total_count + terms["aux_loss"] / num_micro
        return loss, terms

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch):
        total_count = jnp.maximum(batch["mask"].sum(), 1.0)
        micro_batches = _split_micro_batches(batch, num_micro)

        def accumulate(carry, micro_batch):
            loss_sum, grads_sum = carry
            (loss, terms), grads = grad_fn(state.params, micro_batch, total_count)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (loss_sum + loss, grads_sum), terms

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, grads), terms = jax.lax.scan(accumulate, (jnp.zeros(()), zeros), micro_batches)
        if inject_at >= 0:  # fault injection for tests of the non-finite policy
            loss = jnp.where(state.step == inject_at, jnp.nan, loss)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def unless_nonfinite(new, old):
            # A non-finite update never reaches the parameters, whatever the policy; the
            # policy ("stop" or "skip") acts on the host, so the step is the same for both.
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=unless_nonfinite(new_params, state.params),
            opt_state=unless_nonfinite(new_opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        sums = jax.tree.map(lambda x: x.sum(0), terms)
        metrics = {
            "loss": loss,
            "ce_loss": sums["ce_sum"] / total_count,
            "accuracy": sums["correct"] / total_count,
            "aux_loss": sums["aux_loss"] / num_micro,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(state.params),
            "learning_rate": schedule(state.step),
            "finite": finite,
            "nonfinite_steps": new_state.nonfinite_steps,
        }
        for key, value in sums.items():
            if key not in ("ce_sum", "correct", "count", "aux_loss"):
                metrics[key] = value / num_micro
        return new_state, metrics

    return train_step


def make_eval_step(spec: ModelSpec):
    def eval_step(params, batch):
        terms = model_terms(spec, params, batch)
        return {key: terms[key] for key in ("ce_sum", "correct", "count")}

    return eval_step
