"""`run(config, workdir)`: set up, resume, train, evaluate, checkpoint, log.

Workdir layout:
  config.json       the resolved config of the run
  checkpoints/<step>/  Orbax checkpoints (train state + data iterator state)
  events.out.tfevents.*  TensorBoard scalars (process 0), and the memory-behaviour figure
  metrics.jsonl     one JSON object per logged step
  profile/          jax.profiler traces, if requested
"""

import json
import math
import os
import signal

import jax
import numpy as np

import data as data_lib
import optim
from configs import base
from errors import CheckpointError, ConfigError, NonFiniteError
from evals.during_training import TrainingEvals
from training import calibration, config_validation
from training import checkpoint as checkpoint_lib
from training import sharding as sharding_lib
from training.metrics import MetricsLogger, Throughput
from training.state import abstract_like, create_train_state, model_spec
from training.step import make_eval_step, make_train_step


def prepare_workdir(config, workdir: str, *, is_primary: bool) -> None:
    """Refuse a workdir that holds a different run; then record this run's config."""
    config_path = os.path.join(workdir, "config.json")
    current = json.loads(config_validation.to_json(config))
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        defaults = json.loads(config_validation.to_json(base.get_config()))
        changed = config_validation.run_differences(saved, current, defaults)
        if changed and not config.checkpoint.allow_config_change:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise CheckpointError(
                f"{workdir}: holds a run with a different config ({shown}); use a fresh "
                "--workdir or set --config.checkpoint.allow_config_change=True"
            )
    if is_primary:
        os.makedirs(workdir, exist_ok=True)
        temporary = config_path + ".tmp"
        with open(temporary, "w") as f:
            f.write(config_validation.to_json(config))
        os.replace(temporary, config_path)  # atomic: never a half-written config.json


def check_layout(config, mesh) -> None:
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    if micro_batch % devices:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} (micro-batch {micro_batch}) is not "
            f"divisible by the {devices} devices of the mesh's batch axes (data x fsdp)"
        )
    context = mesh.shape["context"]
    sharding_lib.check_context_parallel(config, context)
    if context > jax.local_device_count():
        # Each process loads whole rows of the batch (data.pipeline), so the shards of a
        # sequence must sit on one process's devices.
        raise ConfigError(
            f"mesh.context={context}: more than this process's {jax.local_device_count()} "
            "devices; a sequence is split only across one host's devices"
        )
    if config.train.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def evaluate(eval_step, params, eval_batches, mesh) -> dict[str, float]:
    totals = {"ce_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in eval_batches:
        terms = jax.device_get(eval_step(params, sharding_lib.global_batch(batch, mesh)))
        for key in totals:
            totals[key] += float(terms[key])
    count = max(totals["count"], 1.0)
    loss = totals["ce_sum"] / count
    return {
        "eval_loss": loss,
        "eval_accuracy": totals["correct"] / count,
        "eval_bits_per_token": loss / math.log(2),
    }


def run(config, workdir: str) -> dict[str, float]:
    """Train `config` in `workdir`; returns the last logged metrics."""
    is_primary = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh)
    check_layout(config, mesh)

    data_args = dict(
        global_batch_size=config.train.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = data_lib.build_train_iterator(config.data, seed=config.seed, **data_args)
    eval_batches = []
    if config.eval.every_steps:
        eval_batches = data_lib.build_eval_batches(
            config.data, num_batches=config.eval.num_batches, **data_args
        )

    spec = model_spec(config.model, config.seed)
    num_steps = config.train.num_steps
    schedule = optim.learning_rate_schedule(config.optim, num_steps)
    slimadam_axes = None
    if calibration.needs_calibration(config.optim):
        slimadam_axes = calibration.slimadam_axes(config, spec, mesh)
        if is_primary:
            shared = sum(axes is not None for axes in slimadam_axes.values())
            print(
                f"slimadam: second moment shared along measured axes in {shared} of "
                f"{len(slimadam_axes)} parameters",
                flush=True,
            )
    tx = optim.build(
        config.optim,
        spec.abstract_params,
        spec.logical_specs,
        num_steps=num_steps,
        slimadam_axes=slimadam_axes,
    )
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoint_lib.check_directory(checkpoint_dir)
    # Everything that can fail on bad input has run: only now is the workdir written.
    prepare_workdir(config, workdir, is_primary=is_primary)
    logger = MetricsLogger(workdir, config.train.num_steps, enabled=is_primary)
    training_evals = TrainingEvals(config, spec, logger)
    state, state_shardings = create_train_state(config, spec, tx, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(spec.abstract_params))
    logger.message(f"model: {num_params:,} parameters; mesh: {dict(mesh.shape)}")

    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, config.checkpoint)
    restored = checkpointer.restore_latest(abstract_like(state, state_shardings))
    if restored is not None:
        state, data_state, step = restored
        train_iter.set_state(data_state)
        logger.message(f"resumed from {checkpointer.directory}/{step}")

    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    train_step = jax.jit(
        make_train_step(spec, tx, schedule, config.train),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(spec), in_shardings=(state_shardings.params, batch_sharding))
    train_step, eval_step = (sharding_lib.under_mesh(mesh, f) for f in (train_step, eval_step))

    step = int(state.step)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    throughput = Throughput(tokens_per_step)
    throughput.mark(step)
    profiling = False
    last_saved = step if restored is not None else None
    last = {}
    preemption = Preemption()
    try:
        while step < num_steps:
            if step == config.log.profile_start_step:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profiling = True
            batch = sharding_lib.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics.pop("finite"):
                if config.train.nonfinite == "stop":
                    where = f"{checkpointer.directory}/{last_saved}" if last_saved else "none"
                    first = next(k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k]))
                    raise NonFiniteError(
                        f"non-finite {first} ({metrics[first]}) at step {step}; "
                        f"last good checkpoint: {where}"
                    )
                logger.message(f"step {step}: non-finite update skipped")
            if profiling and step >= config.log.profile_start_step + config.log.profile_num_steps:
                jax.profiler.stop_trace()
                profiling = False

            if step % config.log.every_steps == 0 or step == num_steps:
                tokens_per_second, seconds_per_step = throughput.mark(step)
                last = {**metrics, "tokens_per_second": tokens_per_second}
                logger.write(step, last)
                logger.progress(step, metrics["loss"], tokens_per_second, seconds_per_step)
            if config.eval.every_steps and (
                step % config.eval.every_steps == 0 or step == num_steps
            ):
                eval_metrics = evaluate(eval_step, state.params, eval_batches, mesh)
                logger.write(step, eval_metrics)
                logger.message(
                    f"eval at step {step}: loss {eval_metrics['eval_loss']:.4f}, "
                    f"accuracy {eval_metrics['eval_accuracy']:.4f}"
                )
                last.update(eval_metrics)
                throughput.mark(step)  # evaluation time is not training throughput
            if training_evals.due(step):  # recall / memory behaviour (evals.during_training)
                last.update(training_evals.run(step, state.params))
                throughput.mark(step)
            if (
                step % config.checkpoint.every_steps == 0
                or step == num_steps
                or preemption.requested
            ):
                checkpointer.save(step, state, train_iter.get_state())
                last_saved = step
            if preemption.requested:
                checkpointer.wait()
                logger.message(f"preempted: saved step {step} to {checkpointer.directory}/{step}")
                break
    finally:
        preemption.restore()
        if profiling:
            jax.profiler.stop_trace()
        checkpointer.close()
        logger.close()
    return last
