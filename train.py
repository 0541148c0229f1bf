"""Train a mnemax model.

    python train.py --config=configs/default.py --workdir=runs/default
    python train.py --config=configs/mqar.py --workdir=runs/mqar --config.train.num_steps=200

Multi-process (one process per host, or per GPU): pass --coordinator_address,
--num_processes and --process_id, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; on TPU pods and SLURM/Open MPI clusters JAX finds them itself.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def fail(message: str, exit_code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def parse_flags(argv):
    """absl's parser, but a bad flag or config override is one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError) as error:
        # KeyError's str() is a repr; its first argument is the readable message.
        text = str(error.args[0]) if error.args else type(error).__name__
        text = text.replace("\\n", "\n").replace("\\'", "'")  # config_flags escapes twice
        fail("bad flag: " + " ".join(line.strip(" '") for line in text.splitlines() if line))
    except Exception as error:  # noqa: BLE001 - raised by the user's get_config()
        where = traceback.extract_tb(error.__traceback__)[-1]
        fail(f"--config: {type(error).__name__}: {error} ({where.filename}:{where.lineno})")


def load_config():
    """The config named by --config; config_flags loads it lazily, so errors surface here."""
    try:
        config = _CONFIG.value
        if config is not None:
            config.keys()  # a failed load is an object that raises on first use
        return config
    except Exception as error:  # noqa: BLE001 - any failure in the user's config file
        reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        fail(f"--config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {reason}")


def initialize_distributed():
    coordinator = _COORDINATOR.value
    num_processes = _NUM_PROCESSES.value or _env_int("JAX_NUM_PROCESSES")
    process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("JAX_PROCESS_ID")
    if coordinator or num_processes:
        import jax

        # CPU processes need a collectives backend; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv):
    del argv
    # Orbax and grain log every file operation at INFO; the progress line is what matters.
    logging.set_verbosity(logging.WARNING)
    config = load_config()
    if config is None:
        fail("--config is required (e.g. --config=configs/default.py)")
    if not _WORKDIR.value:
        fail("--workdir is required (e.g. --workdir=runs/default)")
    # Imports after flag parsing so `--help` and flag errors are instant.
    from configs import base
    from errors import MnemaxError
    from training import config_validation, loop

    try:
        config = config_validation.validate(config, base.get_config())
        initialize_distributed()
        loop.run(config, _WORKDIR.value)
    except MnemaxError as error:
        fail(str(error), error.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
