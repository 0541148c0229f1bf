"""Checkpoints: one Orbax CheckpointManager holding the train state and the data iterator.

Orbax writes each step into a temporary directory and renames it when the save is
complete, so a run killed mid-save leaves the previous checkpoints intact. A latest
checkpoint that cannot be read (corrupted, truncated) is skipped with a warning naming it,
moved aside to `corrupt-<step>` (kept for inspection, and so that the resumed run can save
that step again), and the next older one is used.
"""

import os
import sys

import jax
import orbax.checkpoint as ocp

from errors import CheckpointError


def check_directory(directory: str) -> None:
    """Fail early (before anything is written) on a checkpoint path that cannot be used."""
    directory = os.path.abspath(directory)
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: checkpoint path exists but is not a directory")
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise CheckpointError(f"{directory}: checkpoint directory is not readable and writable")


class Checkpointer:
    def __init__(self, directory: str, checkpoint_config):
        self.directory = os.path.abspath(directory)
        check_directory(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=checkpoint_config.keep,
            enable_async_checkpointing=checkpoint_config.async_save,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data")
            )
        except OSError as error:
            raise CheckpointError(f"{self.directory}: cannot open checkpoints ({error})") from None

    def save(self, step: int, state, data_state: dict) -> None:
        """Start saving (asynchronously if configured); returns before the write ends."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state):
        """(state, data_state, step) from the newest readable checkpoint, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            )
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as error:  # noqa: BLE001 - any failure means "unusable"
                self._set_aside(step, error)
                continue
            return restored["state"], restored["data"], step
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.directory, str(step))
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        aside, copy = os.path.join(self.directory, f"corrupt-{step}"), 0
        while os.path.exists(aside):
            copy += 1
            aside = os.path.join(self.directory, f"corrupt-{step}-{copy}")
        print(
            f"warning: skipping unreadable checkpoint {path} ({reason}); moved to {aside}",
            file=sys.stderr,
        )
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, aside)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
