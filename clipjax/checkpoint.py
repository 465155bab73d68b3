"""Orbax checkpointing: periodic async saves, keep-N, resume the latest, restore onto any mesh.

Each checkpoint holds the whole train state (params, optimizer state, model state, EMA, step)
and a JSON ``meta`` item: the task name and every parameter's shape. Before restoring, the meta
is compared with the model being built, so a workdir of another model, or a changed model shape,
fails with one readable error instead of an orbax traceback. The data position is the step
itself (data order is a function of (seed, step)), so nothing else needs saving.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a save
interrupted at any moment (SIGKILL, preemption) never becomes the latest checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from clipjax.optim import param_path


def unwrap_boxed(tree: Any) -> Any:
    """Orbax stores ``nn.Partitioned`` leaves of raw (untyped) restores as ``{'value': array}``;
    returns the tree with those wrappers removed."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: unwrap_boxed(v) for k, v in tree.items()}
    return tree


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir does not fit the model being trained."""


def param_shapes(params: Any) -> dict[str, list[int]]:
    return {param_path(p): list(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, writer: bool = False):
        """``writer=True`` only for the training run that owns the directory: it removes the
        leftovers of saves killed midway. Readers (evaluation, generation, tests) open it
        read-only, so they never touch a save in progress."""
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            # The trainer decides when to save (every_steps, preemption, end) and forces it.
            should_save_fn=lambda step, last: False,
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=writer,   # leftovers of a save killed midway
            read_only=not writer,
            create=writer,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, expected_meta: dict) -> Any:
        """Restores ``step`` with the shardings of ``abstract_state`` (any mesh, any device count)."""
        self.check_compatible(step, expected_meta)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def check_compatible(self, step: int, expected: dict) -> None:
        found = self.read_meta(step)
        where = os.path.join(self.directory, str(step))
        if found.get("task") != expected.get("task"):
            raise CheckpointMismatchError(
                f"{where} holds a checkpoint of {found.get('task')!r}, but this run trains "
                f"{expected.get('task')!r}; use another --workdir (or delete that one)")
        old, new = found.get("param_shapes", {}), expected.get("param_shapes", {})
        if old != new:
            diffs = []
            for k in sorted(set(old) | set(new)):
                if old.get(k) != new.get(k):
                    diffs.append(f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}")
            shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise CheckpointMismatchError(
                f"{where}: the model shape changed since this checkpoint ({len(diffs)} parameters differ: "
                f"{shown}); restore the old model config or use another --workdir")

    def restore_raw(self, step: int) -> Any:
        """The saved state of ``step`` as plain nested dicts of host arrays (no model needed)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_eval_params(path: str) -> tuple[Any, str]:
    """The evaluation parameters (the EMA when the run kept one) of a checkpoint, without a model.

    ``path``: a trainer workdir (its latest checkpoint), its ``checkpoints`` folder, or one step
    directory ``.../checkpoints/<step>``. Opened read-only. Returns ``(params, root)`` with orbax's
    boxed leaves unwrapped, or ``(None, root)`` when ``root`` holds no checkpoint.
    """
    path = os.path.abspath(path)
    root, step = path, None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        root = os.path.join(path, "checkpoints")
    elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        root, step = os.path.dirname(path), int(os.path.basename(path))
    checkpointer = Checkpointer(root, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            return None, root
        state = checkpointer.restore_raw(step)
    finally:
        checkpointer.close()
    return unwrap_boxed(state.get("ema_params") or state["params"]), root
