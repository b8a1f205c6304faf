"""Host-side input pipeline on grain: prepared records -> uint8 batches -> sharded arrays.

Records come from `tfds.data_source` (array_record, random access, no TensorFlow) with photos left
encoded. grain turns them into batches: a `grain.MapDataset` whose element b is batch b, read,
decoded and tokenised by `worker_count` worker processes (0: in this process), then copied to the
devices by a prefetch thread while the current step runs. Photos stay uint8 at the model's size;
normalisation and augmentation happen on the device (`photos.PhotoTransform`).

Which examples batch b holds is ours, not grain's, so that it is a pure function of b:
  * training: epoch e is the permutation seeded by (seed, e), its short tail dropped, so step s
    sees the same examples however the run was interrupted or split;
  * evaluation: each example once, in order; the last batch is padded (mask 0, index -1).
Each process reads only its block of rows of every global batch (`process_slice`), which is what
makes one process with two devices and two processes with one device each see the same global
batch. grain's iterator state is checkpointed with the train state (`train_lib.fit`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from jmmshap import parallel, photos
from jmmshap.tokenizer import TitleTokenizer

Batch = dict[str, np.ndarray]


class RecordSource(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...


def read_records(source: RecordSource, indices: Sequence[int]) -> list[dict[str, Any]]:
  """Batched random access when the source supports it (array_record reads in parallel)."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return as_text(value.item())
  return str(value)


def decode_image(value: Any, size: int | None = None) -> np.ndarray:
  """uint8 (H, W, 3) from encoded bytes or a decoded array; with `size`, resized to size x size.

  A JPEG much larger than `size` is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself
  (PIL's `draft`: the DCT is scaled, never below `size`), which is most of the cost of a large
  photo. The bilinear resize that follows is the same whatever the decoding scale was chosen.
  """
  if isinstance(value, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(value)) as image:
      if size and image.format == "JPEG":
        image.draft("RGB", (size, size))
      return _resized(image.convert("RGB"), size)
  array = np.asarray(value)
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  if size and array.shape[:2] != (size, size):
    return _resized(Image.fromarray(array), size)
  return array


def _resized(image: Image.Image, size: int | None) -> np.ndarray:
  if size and image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image)


class Preprocessor:
  """Records -> a host batch: label, id, the tokenised title, the photo as uint8 at `image_size`.

  It runs in grain's workers (it pickles with its tokenizer). `mean`/`std` are the photos'
  normalisation, which the jitted steps apply (`photo_transform`); `normalised` applies it to a
  host batch for code that takes float pixels on the host (the MM-SHAP explainer).
  """

  def __init__(self, tokenizer: TitleTokenizer | None, image_size: int | None,
               image_mean: Sequence[float] = photos.IMAGENET_MEAN,
               image_std: Sequence[float] = photos.IMAGENET_STD):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.mean = tuple(float(m) for m in image_mean)
    self.std = tuple(float(s) for s in image_std)

  def photo_transform(self, augmentation: photos.Augmentation | None = None,
                      seed: int = 0) -> photos.PhotoTransform:
    return photos.PhotoTransform(self.mean, self.std, augmentation, seed)

  def normalised(self, batch: Batch) -> Batch:
    """The batch with float32 normalised pixel_values, on the host, for code that moves its inputs
    to the devices itself (the MM-SHAP explainer): no round trip through a device."""
    if "pixel_values" not in batch:
      return batch
    return {**batch, "pixel_values": photos.normalise_on_host(batch["pixel_values"], self.mean,
                                                              self.std)}

  def __call__(self, records: Sequence[dict[str, Any]]) -> Batch:
    batch: Batch = {
        "label": np.asarray([int(r["label"]) for r in records], np.int32),
        "id": np.asarray([as_text(r["id"]) for r in records]),
    }
    if self.tokenizer is not None:
      batch.update(self.tokenizer([as_text(r["title"]) for r in records]))
    if self.image_size:
      batch["pixel_values"] = np.stack([decode_image(r["image"], self.image_size)
                                        for r in records])
    return batch


# ---------------------------------------------------------------------------------------------------
# Which examples each batch holds.


def process_slice(global_batch_size: int) -> slice:
  """Which rows of each global batch this process reads."""
  local = global_batch_size // jax.process_count()
  start = jax.process_index() * local
  return slice(start, start + local)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f"the training split has {num_examples} examples, fewer than one batch of "
                     f"{global_batch_size}: lower batch_size")
  return steps


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class TrainOrder:
  """Step s (0-based) -> the examples of its global batch: epoch e is the permutation seeded by
  (seed, e), cut into full batches (the short tail is dropped)."""
  num_examples: int
  global_batch_size: int
  seed: int
  padded = False

  def __call__(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, steps_per_epoch(self.num_examples, self.global_batch_size))
    order = _epoch_order(self.num_examples, self.seed, epoch)
    return order[position * self.global_batch_size:(position + 1) * self.global_batch_size]


@dataclasses.dataclass(frozen=True)
class SplitOrder:
  """Batch b -> examples b*B .. (b+1)*B - 1 in split order, -1 past the end (padding);
  `drop_remainder` keeps only full batches."""
  num_examples: int
  global_batch_size: int
  drop_remainder: bool = False

  @property
  def padded(self) -> bool:
    return not self.drop_remainder

  def __len__(self) -> int:
    if self.drop_remainder:
      return self.num_examples // self.global_batch_size
    return -(-self.num_examples // self.global_batch_size)

  def __call__(self, batch: int) -> np.ndarray:
    indices = np.arange(batch * self.global_batch_size, (batch + 1) * self.global_batch_size)
    return np.where(indices < self.num_examples, indices, -1)


@dataclasses.dataclass(frozen=True)
class LoadBatch:
  """Batch b of an order, this process's rows only: read, decoded, tokenised (in a grain worker).

  A padded order's batches carry `mask` (1 for a real example) and `index` (its position in the
  split, -1 for padding rows, which repeat example 0).
  """
  source: RecordSource
  preprocess: Callable[[Sequence[dict]], Batch]
  order: Callable[[int], np.ndarray]
  rows: slice

  def __call__(self, batch_number: int) -> Batch:
    indices = self.order(batch_number)[self.rows]
    real = indices >= 0
    batch = self.preprocess(read_records(self.source, np.where(real, indices, 0)))
    if getattr(self.order, "padded", False):
      batch["mask"] = real.astype(np.float32)
      batch["index"] = indices.astype(np.int32)
    return batch


# ---------------------------------------------------------------------------------------------------
# Loaders.


def default_worker_count() -> int:
  """Worker processes when a config leaves `data.worker_count` unset: a core each, one left for
  the process that runs the steps; none where the CPU is also the accelerator (its cores run the
  model; the fashion image stage on 2 cores trains no slower with one read thread than before,
  docs/BENCHMARKS.md)."""
  if jax.default_backend() == "cpu":
    return 0
  return max(0, min(16, parallel.usable_cores() - 1))


def default_read_threads() -> int:
  """Threads that read and decode batches in the main process when it has no workers: one on a
  CPU backend (its cores run the model), else one per core (PIL decodes and resizes without the
  GIL)."""
  if jax.default_backend() == "cpu":
    return 1
  return min(16, parallel.usable_cores())


def worker_count(data_config: Any) -> int:
  """`data.worker_count` of a config; None or -1 (or absent): `default_worker_count()`."""
  count = data_config.get("worker_count") if hasattr(data_config, "get") else None
  return default_worker_count() if count is None or count < 0 else int(count)


def _die_with_the_parent(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: a worker ends when the process that started it is gone. Without it a
  run killed with SIGKILL leaves its workers behind, each holding a decoder's memory and waiting
  for a parent that will never read again. (A watchdog thread, not Linux's PR_SET_PDEATHSIG, which
  fires when the parent *thread* that started the worker ends, and grain's prefetch threads come
  and go.)"""
  del worker_index, worker_count
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(_WATCHDOG_PERIOD_S)
    os._exit(1)

  threading.Thread(target=watch, name="jmmshap-parent-watchdog", daemon=True).start()


_WATCHDOG_PERIOD_S = 0.5


def _allow_grain_flags() -> None:
  # grain reads absl flags of its own; outside an absl app (tests, notebooks, scripts without
  # app.run) nothing has parsed them, and their defaults are what we want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def loader(source: RecordSource, preprocess: Callable[[Sequence[dict]], Batch],
           order: Callable[[int], np.ndarray], *, global_batch_size: int, start: int, stop: int,
           worker_count: int = 0, transform: Callable[[Batch], Any] | None = None,
           buffer_size: int = 2, read_threads: int | None = None) -> grain.DatasetIterator:
  """An iterator over batches start..stop-1 of `order` (this process's rows of each).

  `worker_count` processes read and decode batches in parallel (grain `mp_prefetch`, each worker
  its own batches, in order, at most 2 ahead); without workers `read_threads` threads of this
  process do (default: `default_read_threads()`), at most one batch each ahead. `transform`
  (e.g. the copy to the devices) runs in a prefetch thread `buffer_size` batches ahead. So the
  batches in flight, and the memory they take, are bounded whatever the consumer's speed. The
  iterator is checkpointable (`get_state` / `set_state`); close it to stop its workers.
  """
  _allow_grain_flags()
  rows = process_slice(global_batch_size)
  dataset = grain.MapDataset.range(start, stop).map(LoadBatch(source, preprocess, order, rows))
  # grain's default reads 16 elements at once and up to 500 ahead: unbounded memory for batches of
  # photos. A worker process reads one batch at a time (its queue holds the next ones).
  threads = 0 if worker_count else (read_threads or default_read_threads())
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=max(1, threads)))
  if worker_count:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2),
        worker_init_fn=_die_with_the_parent)
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=buffer_size)
  return iter(dataset)


def eval_loader(source: RecordSource, preprocess: Callable[[Sequence[dict]], Batch], *,
                global_batch_size: int, worker_count: int = 0, drop_remainder: bool = False,
                transform: Callable[[Batch], Any] | None = None, count: int | None = None,
                read_threads: int | None = None) -> grain.DatasetIterator:
  """Each of a split's first `count` examples (all: None) once, in order (see `SplitOrder`)."""
  order = SplitOrder(len(source) if count is None else count, global_batch_size, drop_remainder)
  return loader(source, preprocess, order, global_batch_size=global_batch_size, start=0,
                stop=len(order), worker_count=worker_count, transform=transform,
                read_threads=read_threads)


def eval_batches(source: RecordSource, preprocess: Callable[[Sequence[dict]], Batch], *,
                 global_batch_size: int, worker_count: int = 0,
                 drop_remainder: bool = False) -> Iterator[Batch]:
  """`eval_loader`'s batches as a generator that closes the loader when done or dropped."""
  batches = eval_loader(source, preprocess, global_batch_size=global_batch_size,
                        worker_count=worker_count, drop_remainder=drop_remainder)
  try:
    yield from batches
  finally:
    batches.close()
