"""Host-side input pipeline: random-access records -> fixed-shape numpy batches -> sharded arrays.

Records come from `tfds.data_source` (array_record, no TensorFlow). Training order is a seeded
permutation per epoch, so step s always sees the same examples: a resumed run continues exactly where
an uninterrupted one would be. Evaluation walks each split once in order; the last batch is padded and
masked so every example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

from jmmshap.tokenizer import TitleTokenizer

Batch = dict[str, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation.
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def decode_image(value: Any) -> np.ndarray:
  """uint8 (H, W, 3) from a decoded array or encoded bytes."""
  if isinstance(value, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(value)) as image:
      return np.asarray(image.convert("RGB"))
  array = np.asarray(value)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return array


class Preprocessor:
  """Tokenises titles and resizes/normalises images for a list of records."""

  def __init__(self, tokenizer: TitleTokenizer | None, image_size: int | None,
               image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.image_mean = np.asarray(image_mean, np.float32)
    self.image_std = np.asarray(image_std, np.float32)

  def image(self, value: Any) -> np.ndarray:
    array = decode_image(value)
    if array.shape[:2] != (self.image_size, self.image_size):
      resized = Image.fromarray(array).resize((self.image_size, self.image_size), Image.BILINEAR)
      array = np.asarray(resized)
    return (array.astype(np.float32) / 255.0 - self.image_mean) / self.image_std

  def __call__(self, records: Sequence[dict[str, Any]]) -> Batch:
    batch: Batch = {
        "label": np.asarray([int(r["label"]) for r in records], np.int32),
        "id": np.asarray([as_text(r["id"]) for r in records]),
    }
    if self.tokenizer is not None:
      batch.update(self.tokenizer([as_text(r["title"]) for r in records]))
    if self.image_size:
      batch["pixel_values"] = np.stack([self.image(r["image"]) for r in records])
    return batch


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


def random_flip(batch: Batch, draws: np.ndarray) -> Batch:
  """Mirrors the photos whose draw is < 1/2: a product mirrored left-right is the same product."""
  flip = draws < 0.5
  batch["pixel_values"] = np.where(flip[:, None, None, None], batch["pixel_values"][:, :, ::-1],
                                   batch["pixel_values"])
  return batch


def bilinear_sample(images: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """images (B, H, W, C) sampled at the grid rows (B, H') x columns (B, W') (pixel coordinates,
  clamped at the edges): (B, H', W', C)."""
  height, width = images.shape[1:3]
  rows = np.clip(rows, 0, height - 1)
  columns = np.clip(columns, 0, width - 1)
  top = np.floor(rows).astype(np.int32)
  left = np.floor(columns).astype(np.int32)
  bottom = np.minimum(top + 1, height - 1)
  right = np.minimum(left + 1, width - 1)
  dy = (rows - top)[:, :, None, None].astype(images.dtype)
  dx = (columns - left)[:, None, :, None].astype(images.dtype)
  b = np.arange(len(images))[:, None, None]

  def at(r, c):
    return images[b, r[:, :, None], c[:, None, :]]

  upper = at(top, left) * (1 - dx) + at(top, right) * dx
  lower = at(bottom, left) * (1 - dx) + at(bottom, right) * dx
  return upper * (1 - dy) + lower * dy


def random_resized_crop(images: np.ndarray, draws: np.ndarray, area: tuple[float, float],
                        aspect_ratio: tuple[float, float]) -> np.ndarray:
  """Inception-style crops resized back to the image size, one per row of `draws` (B, 4 uniforms).

  A crop covers a fraction of the image drawn uniformly from `area`, with a width/height ratio
  drawn log-uniformly from `aspect_ratio` (each side clipped to the image), at a uniform position.
  Only geometry changes: every output pixel is a convex mix of input pixels, so colours are kept
  (a product's colour is often what tells its class). Without a retry loop, the number of draws
  per example is fixed, which keeps the crops a function of (seed, step).
  """
  height, width = images.shape[1:3]
  fraction = area[0] + (area[1] - area[0]) * draws[:, 0]
  log_low, log_high = np.log(aspect_ratio[0]), np.log(aspect_ratio[1])
  ratio = np.exp(log_low + (log_high - log_low) * draws[:, 1])
  crop_width = np.clip(np.sqrt(fraction * height * width * ratio), 1.0, width)
  crop_height = np.clip(np.sqrt(fraction * height * width / ratio), 1.0, height)
  left = draws[:, 2] * (width - crop_width)
  top = draws[:, 3] * (height - crop_height)
  # Output pixel centres mapped into the crop box (as torch's align_corners=False resize).
  rows = top[:, None] + (np.arange(height) + 0.5) * (crop_height / height)[:, None] - 0.5
  columns = left[:, None] + (np.arange(width) + 0.5) * (crop_width / width)[:, None] - 0.5
  return bilinear_sample(images, rows, columns)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Training-photo augmentation that keeps colour: random-resized crops, then left-right flips.

  `__call__(batch, draws)` takes `draws_per_example` uniforms per row; `train_batches` draws them
  from (seed, epoch, position), so a resumed run or any number of processes augments alike. The
  flip reads the first draw of a row, which is the same draw with or without crops.
  """
  flip: bool = False
  crop_area: tuple[float, float] | None = None  # None: no crops.
  crop_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)

  @property
  def draws_per_example(self) -> int:
    return 1 + (4 if self.crop_area is not None else 0)

  def __call__(self, batch: Batch, draws: np.ndarray) -> Batch:
    if self.crop_area is not None:
      batch["pixel_values"] = random_resized_crop(
          batch["pixel_values"], draws[:, 1:5], tuple(self.crop_area), tuple(self.crop_aspect_ratio))
    if self.flip:
      batch = random_flip(batch, draws[:, 0])
    return batch


def train_batches(source: RecordSource, preprocess: Callable[[Sequence[dict]], Batch], *,
                  global_batch_size: int, seed: int, start_step: int = 0,
                  augment: Augmentation | None = None) -> Iterator[Batch]:
  """Endless training batches; epoch e is the permutation seeded by (seed, e), short tail dropped.

  `augment(batch, draws)` gets `augment.draws_per_example` uniform draws per row, seeded by
  (seed, epoch, position) and drawn for the whole global batch, so a resumed run or any number of
  processes augments the same way. Draw k of every row comes from the k-th block of draws, so
  adding draws (crops) leaves the earlier ones (flips) as they were.
  """
  num_examples = len(source)
  per_epoch = steps_per_epoch(num_examples, global_batch_size)
  rows = process_slice(global_batch_size)
  step = start_step
  while True:
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for position in range(offset, per_epoch):
      indices = order[position * global_batch_size:(position + 1) * global_batch_size][rows]
      batch = preprocess(read_records(source, indices))
      if augment is not None:
        draws = np.random.default_rng([seed, epoch, position]).random(
            (augment.draws_per_example, global_batch_size)).T[rows]
        batch = augment(batch, draws)
      yield batch
    step = (epoch + 1) * per_epoch


def eval_batches(source: RecordSource, preprocess: Callable[[Sequence[dict]], Batch], *,
                 global_batch_size: int) -> Iterator[Batch]:
  """Each example once, in order; padding rows repeat example 0 and carry mask 0 and index -1."""
  num_examples = len(source)
  rows = process_slice(global_batch_size)
  for start in range(0, num_examples, global_batch_size):
    indices = np.arange(start, start + global_batch_size)[rows]
    real = indices < num_examples
    batch = preprocess(read_records(source, np.where(real, indices, 0)))
    batch["mask"] = real.astype(np.float32)
    batch["index"] = np.where(real, indices, -1).astype(np.int32)
    yield batch


def prefetch(batches: Iterator[Batch], size: int = 2,
             transform: Callable[[Batch], Any] | None = None) -> Iterator[Any]:
  """Prepares the next batches in a background thread while the devices work on the current one.

  `transform` runs in that thread too: with the host-to-device copy (`parallel.to_global`) as the
  transform, batch n+1 is already on the devices when step n ends.
  """
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def offer(item) -> bool:
    """Puts `item` once there is room; False (item dropped) once the consumer has stopped."""
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in batches:
        if not offer(batch if transform is None else transform(batch)):
          return
      offer(done)
    except BaseException as error:  # pylint: disable=broad-except
      offer(error)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    # Closing the iterator (or dropping it) stops the thread and waits for it: the thread may be
    # copying a batch to the devices, and must not be left doing so when the process exits.
    stop.set()
    thread.join()
