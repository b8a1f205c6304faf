"""Every Orbax checkpoint of the pipeline is made, saved, checked and restored here.

Every checkpoint folder gets its `ocp.CheckpointManager` from `manager()`, which gives each manager
barrier names of its own (why: see `manager`). A trained stage has two folders (`StageCheckpoints`):
`checkpoints/`, the latest full train states a restarted run resumes from, and `best/`, the model
selected on validation with its scores, which evaluation and later stages restore (`restore_best`).

Restoring a checkpoint written under another config (another width, depth, class count) fails
inside Orbax or XLA with a message about array shapes and no names. Comparing the checkpoint's
metadata with the target tree first turns that into one error listing every missing, unexpected and
reshaped parameter by name.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from jmmshap import errors, workdir


class CheckpointMismatchError(ValueError, errors.UserError):
  """A checkpoint written by a model of another shape than the one restoring it."""


def _name(path: tuple) -> str:
  parts = []
  for key in path:
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shape(leaf: Any) -> tuple[int, ...] | None:
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return None  # Stored as its raw key data, whose shape depends on the RNG implementation.
  return tuple(getattr(leaf, "shape", ()))


def shapes_by_name(tree: Any) -> dict[str, tuple[int, ...] | None]:
  """Leaf name ('params/bert/embeddings/...') -> shape (None: not compared), for arrays, abstract
  arrays or checkpoint metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(path): _shape(leaf) for path, leaf in leaves}


def differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  lines = []
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  reshaped = sorted(name for name in set(saved) & set(expected)
                    if None not in (saved[name], expected[name]) and saved[name] != expected[name])
  if missing:
    lines.append(f"missing from the checkpoint ({len(missing)}): {', '.join(missing[:10])}"
                 + (" ..." if len(missing) > 10 else ""))
  if unexpected:
    lines.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:10])}"
                 + (" ..." if len(unexpected) > 10 else ""))
  for name in reshaped[:10]:
    lines.append(f"{name}: {saved[name]} in the checkpoint, {expected[name]} in the model")
  if len(reshaped) > 10:
    lines.append(f"... and {len(reshaped) - 10} more parameters of other shapes")
  return lines


# How many managers this process has made per barrier name; see `manager`.
_managers_per_name: collections.Counter = collections.Counter()


def barrier_prefix(directory: str) -> str:
  """A barrier-name prefix for a manager of `directory`, unique within this process and the same
  in every process (see `manager`)."""
  name = "/".join(os.path.normpath(os.path.abspath(directory)).split(os.sep)[-2:])
  _managers_per_name[name] += 1
  return f"jmmshap:{name}#{_managers_per_name[name]}"


def manager(directory: str, item_handlers: Mapping[str, ocp.CheckpointHandler], *,
            max_to_keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
  """The Orbax manager of one checkpoint folder; every stage makes its managers here.

  Why the barrier prefix. In a multi-process job every process writes its shards of a step and
  then waits at a coordination-service barrier that Orbax names after the step folder alone
  (`async_write_complete.<step>`, `async_commit_complete.<step>`). A classifier stage saves the
  latest train state (`checkpoints/4`) and the best model (`best/4`) at the same step, both
  asynchronously: without a prefix their background threads wait at the same barrier, so one
  process's `checkpoints` save met the other's `best` save there. The result was a finalize that
  saw array metadata from one process only ("ArrayMetadata Store contains metadata from just one
  process"), "Barrier _async_write_complete.4 is already ongoing", or a five-minute hang; which one
  depended on thread timing. A prefix per folder keeps each manager's barriers its own; the count
  keeps a folder reopened in the same process (a rerun, a restore) off its earlier barriers. Every
  process runs the same code, so it makes the same managers in the same order and the prefixes
  agree across processes.

  Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once
  complete, and deletes old steps only after that, so a run killed mid-save still has its previous
  checkpoint; `latest_step` never sees the unfinished one, and with `create=True` (the writer) the
  restarted run deletes it.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=barrier_prefix(directory)))
  return ocp.CheckpointManager(directory, item_handlers=dict(item_handlers), options=options)


def check_matches(manager: ocp.CheckpointManager, step: int, item: str, target: Any,
                  where: str) -> None:
  """Raises CheckpointMismatchError naming every difference between checkpoint item and target.

  `manager` must know the item's handler (`item_handlers=...`) so that its metadata can be read.
  """
  metadata = manager.item_metadata(step)[item]
  if metadata is None:  # No metadata to compare: leave it to the restore.
    return
  problems = differences(shapes_by_name(metadata), shapes_by_name(target))
  if problems:
    raise CheckpointMismatchError(
        f"{where} (step {step}) was written by a model of another config:\n  "
        + "\n  ".join(problems)
        + "\n  Restore it with the config it was trained with (its config.json), or train this "
          "config in another --workdir.")


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """Shapes and dtypes of `tree` (placed with `sharding`): the target of a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, where: str, *,
            arrays: Mapping[str, Any] | None = None, json_items: tuple[str, ...] = ()) -> dict:
  """Items of one step: array trees into their abstract targets (checked first with
  `check_matches`), JSON items as they are."""
  arrays = dict(arrays or {})
  for item, target in arrays.items():
    check_matches(manager, step, item, target, where)
  args = {item: ocp.args.StandardRestore(target) for item, target in arrays.items()}
  args.update({item: ocp.args.JsonRestore() for item in json_items})
  return dict(manager.restore(step, args=ocp.args.Composite(**args)))


def save(manager: ocp.CheckpointManager, step: int, *, arrays: Mapping[str, Any] | None = None,
         json_items: Mapping[str, Any] | None = None) -> None:
  """Saves one step (asynchronously): array trees and JSON items, each under its item name."""
  args = {item: ocp.args.StandardSave(tree) for item, tree in (arrays or {}).items()}
  args.update({item: ocp.args.JsonSave(value) for item, value in (json_items or {}).items()})
  manager.save(step, args=ocp.args.Composite(**args))


def _best_handlers() -> dict[str, ocp.CheckpointHandler]:
  # Handlers (not just item names) so that a checkpoint's metadata can be read before restoring.
  return {"model": ocp.StandardCheckpointHandler(), "metrics": ocp.JsonCheckpointHandler()}


class StageCheckpoints:
  """The latest train states (`checkpoints/`, resume) and the best model (`best/`) of a stage."""

  def __init__(self, directory: str, keep: int = 2):
    self.latest_path = os.path.join(directory, workdir.CHECKPOINTS)
    self.best_path = os.path.join(directory, workdir.BEST)
    self.latest = manager(self.latest_path, {"state": ocp.StandardCheckpointHandler(),
                                             "data": ocp.JsonCheckpointHandler()},
                          max_to_keep=keep, create=True)
    self.best = manager(self.best_path, _best_handlers(), max_to_keep=1, create=True)

  def latest_step(self) -> int:
    return self.latest.latest_step() or 0

  def restore_latest(self, step: int, abstract_state: Any) -> Any:
    return restore(self.latest, step, self.latest_path, arrays={"state": abstract_state})["state"]

  def data_position(self, step: int) -> dict | None:
    """The input pipeline's position saved with step `step` (`save_latest`'s `data`); None for a
    checkpoint written without one."""
    if not os.path.isdir(os.path.join(self.latest_path, str(step), "data")):
      return None
    return restore(self.latest, step, self.latest_path, json_items=("data",))["data"]

  def best_scores(self) -> dict | None:
    """The scores saved with the best model; None before the first one."""
    step = self.best.latest_step()
    if step is None:
      return None
    return restore(self.best, step, self.best_path, json_items=("metrics",))["metrics"]

  def save_latest(self, step: int, state: Any, data: Mapping[str, Any] | None = None) -> None:
    """The train state, and the input pipeline's position (JSON, e.g. grain's iterator state)."""
    save(self.latest, step, arrays={"state": state},
         json_items=None if data is None else {"data": data})

  def save_best(self, step: int, model: Any, scores: Mapping[str, Any]) -> None:
    save(self.best, step, arrays={"model": model}, json_items={"metrics": {"step": step, **scores}})

  def wait_until_finished(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def restore_best(directory: str, abstract_model: Any) -> tuple[Any, dict]:
  """(model tree, validation scores) of the best checkpoint in a stage folder."""
  path = os.path.join(directory, workdir.BEST)
  best = manager(path, _best_handlers())
  step = best.latest_step()
  if step is None:
    best.close()
    raise workdir.StageNotTrained(f"{path}: no checkpoint to restore; train the stage first "
                                  "(run without --config.mode=eval).")
  restored = restore(best, step, path, arrays={"model": abstract_model}, json_items=("metrics",))
  best.close()
  return restored["model"], restored["metrics"]
