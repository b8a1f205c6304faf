"""TensorBoard event files in the stage folders, so that `tensorboard --logdir W` shows every stage.

Each folder is one TensorBoard run (W/text, W/image, W/mmbt, W/clip_pretrain, W/meta/<method>,
W/mmshap) and holds one event file, written by process 0 only (`workdir.is_writer`; on the other
processes an `Events` is inert). The training stages' scalars are log.jsonl's records, tagged
`{split}/{name}` (`train_lib.Logger` writes both); the mmshap stage writes its T-SHAP histograms.

Opening an `Events` replaces the folder's earlier event files by a new one that starts with the
records given: a resumed run passes log.jsonl's records up to its checkpoint, so the folder never
holds a killed run's steps next to the resumed run's, and its curves are always log.jsonl's. (A
TensorBoard showing the folder meanwhile drops the replaced steps as the replayed ones arrive: its
data server discards a series' points from a step that comes again.)

tensorboardX writes the files, without TensorFlow: its synchronous `EventsWriter`, not its
`SummaryWriter`, whose queue and background thread let the file lag behind log.jsonl. Every write
is flushed, as each log.jsonl line is.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jmmshap import workdir

# tensorboardX's writer module imports torch where it is installed, only to accept torch tensors.
# A training process must not load a second framework for that (seconds of start-up, and its own
# CUDA libraries next to JAX's), so the import runs with torch hidden unless it is loaded already.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None.
try:
  from tensorboardX import event_file_writer, summary
  from tensorboardX.proto import event_pb2
finally:
  if _HIDE_TORCH:
    del sys.modules["torch"]

# TensorBoard reads the files whose names contain "tfevents"; tensorboardX names them
# events.out.tfevents.<time>.<host><suffix>.
FILE_PREFIX = "events.out.tfevents."


def event_files(directory: str) -> list[str]:
  """The event files directly in `directory` (TensorBoard reads each folder's as one run)."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                if name.startswith(FILE_PREFIX))


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """A log.jsonl record's numbers as `{split}/{name}` tags; None (an untimed window) is left out."""
  split = record.get("split", "train")
  return {f"{split}/{name}": float(value) for name, value in record.items()
          if name not in ("split", "step") and isinstance(value, (int, float))
          and not isinstance(value, bool)}


class Events:
  """One stage folder's event file (see the module docstring); a context manager that closes it."""

  def __init__(self, directory: str, records: Iterable[Mapping[str, Any]] = ()):
    self.directory = directory
    self._writer: event_file_writer.EventsWriter | None = None
    if not workdir.is_writer():
      return
    os.makedirs(directory, exist_ok=True)
    for path in event_files(directory):  # Not workdir.remove: the other processes are not here.
      os.remove(path)
    # The process id in the name: two processes' files would never share one.
    self._writer = event_file_writer.EventsWriter(os.path.join(directory, "events"),
                                                  f".{os.getpid()}")
    for record in records:
      self.log(record, flush=False)
    self._writer.flush()

  @property
  def writing(self) -> bool:
    """Whether this process writes (process 0, until `close`)."""
    return self._writer is not None

  def log(self, record: Mapping[str, Any], flush: bool = True) -> None:
    """A log.jsonl record's scalars (`scalars`) at its step."""
    if self._writer is None:
      return
    for tag, value in scalars(record).items():
      self._writer.write_event(self._event(record["step"], summary=summary.scalar(tag, value)))
    if flush:
      self._writer.flush()

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is not None:
      self._writer.write_event(self._event(step, summary=summary.scalar(tag, float(value))))
      self._writer.flush()

  def histogram(self, tag: str, values: np.ndarray, step: int,
                bins: np.ndarray | int | str = "auto") -> None:
    """The finite values' histogram (TensorBoard's cannot hold NaN); nothing if none is finite."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if self._writer is not None and values.size:
      self._writer.write_event(self._event(step, summary=summary.histogram(tag, values, bins)))
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "Events":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  @staticmethod
  def _event(step: int, **fields: Any) -> event_pb2.Event:
    return event_pb2.Event(wall_time=time.time(), step=int(step), **fields)
