"""Checks that an Orbax checkpoint fits the model about to be restored, before restoring it.

Restoring a checkpoint written under another config (another width, depth, class count) fails
inside Orbax or XLA with a message about array shapes and no names. Comparing the checkpoint's
metadata with the target tree first turns that into one error listing every missing, unexpected and
reshaped parameter by name.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
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
