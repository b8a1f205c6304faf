"""Photo preprocessing on the device: uint8 photos in, normalised and augmented float32 out.

Photos cross from the host to the devices as uint8 (4x fewer bytes than float32) and become model
inputs inside the jitted step: mean/std normalisation, random-resized crops and left-right flips
all run there, where they cost nothing next to the model. Augmentation is a function of
(seed, step) and of the row in the global batch only: its uniforms come from
`jax.random.fold_in(key(seed), step)` drawn for the whole global batch, and JAX's partitionable
threefry gives the same values however the batch is split over devices, processes or host
workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation.
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (..., 3) photos -> float32 (x / 255 - mean) / std, as the towers were trained on."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (pixels.astype(jnp.float32) / 255.0 - mean) / std


def normalise_on_host(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """The numpy twin of `normalise`, for float pixels wanted on the host (`Preprocessor.normalised`)."""
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (pixels.astype(np.float32) / 255.0 - mean) / std


def _resampling(start: jax.Array, size: jax.Array, length: int) -> jax.Array:
  """(B, length, length): row o mixes the input pixels around the crop's o-th output centre.

  Output centres map into the crop box as torch's align_corners=False resize does, clamped to the
  image; the tent weights max(0, 1 - |source - i|) are exactly bilinear interpolation, so a crop is
  two small matmuls per photo instead of a gather.
  """
  centres = (jnp.arange(length, dtype=jnp.float32) + 0.5)[None, :]
  source = jnp.clip(start[:, None] + centres * (size / length)[:, None] - 0.5, 0, length - 1)
  pixels = jnp.arange(length, dtype=jnp.float32)[None, None, :]
  return jnp.maximum(0.0, 1.0 - jnp.abs(source[:, :, None] - pixels))


def random_resized_crop(images: jax.Array, draws: jax.Array, area: tuple[float, float],
                        aspect_ratio: tuple[float, float]) -> jax.Array:
  """Inception-style crops resized back to the image size, one per row of `draws` (B, 4 uniforms).

  A crop covers a fraction of the image drawn uniformly from `area`, with a width/height ratio
  drawn log-uniformly from `aspect_ratio` (each side clipped to the image), at a uniform position.
  Only geometry changes: every output pixel is a convex mix of input pixels, so colours are kept
  (a product's colour is often what tells its class). Without a retry loop the number of draws per
  example is fixed, which keeps the crops a function of (seed, step).
  """
  height, width = images.shape[1:3]
  fraction = area[0] + (area[1] - area[0]) * draws[:, 0]
  log_low, log_high = np.log(aspect_ratio[0]), np.log(aspect_ratio[1])
  ratio = jnp.exp(log_low + (log_high - log_low) * draws[:, 1])
  crop_width = jnp.clip(jnp.sqrt(fraction * height * width * ratio), 1.0, width)
  crop_height = jnp.clip(jnp.sqrt(fraction * height * width / ratio), 1.0, height)
  left = draws[:, 2] * (width - crop_width)
  top = draws[:, 3] * (height - crop_height)
  rows = _resampling(top, crop_height, height)  # (B, H, H)
  columns = _resampling(left, crop_width, width)  # (B, W, W)
  images = images.astype(jnp.float32)
  return jnp.einsum("boh,bhwc,bpw->bopc", rows, images, columns,
                    precision=jax.lax.Precision.HIGHEST)


def random_flip(images: jax.Array, draws: jax.Array) -> jax.Array:
  """Mirrors the photos whose draw is < 1/2: a product mirrored left-right is the same product."""
  return jnp.where((draws < 0.5)[:, None, None, None], images[:, :, ::-1], images)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Training-photo augmentation that keeps colour: random-resized crops, then left-right flips.

  `draws(seed, step, batch_size)` gives `draws_per_example` uniforms per row of the global batch;
  the flip reads the first, which is the same draw with or without crops.
  """
  flip: bool = False
  crop_area: tuple[float, float] | None = None  # None: no crops.
  crop_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)

  @property
  def draws_per_example(self) -> int:
    return 1 + (4 if self.crop_area is not None else 0)

  def draws(self, seed: int, step: jax.Array, batch_size: int) -> jax.Array:
    """(B, draws_per_example) uniforms of training step `step` (0-based); column k comes from its
    own key, so adding draws (crops) leaves the earlier ones (flips) as they were."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jnp.stack([jax.random.uniform(jax.random.fold_in(key, k), (batch_size,), jnp.float32)
                      for k in range(self.draws_per_example)], axis=1)

  def __call__(self, images: jax.Array, draws: jax.Array) -> jax.Array:
    if self.crop_area is not None:
      images = random_resized_crop(images, draws[:, 1:5], tuple(self.crop_area),
                                   tuple(self.crop_aspect_ratio))
    if self.flip:
      images = random_flip(images, draws[:, 0])
    return images


@dataclasses.dataclass(frozen=True)
class PhotoTransform:
  """What a stage does to its uint8 photos on the device: normalisation, and in training the
  augmentation of step s drawn from (seed, s). Photos are augmented as uint8-valued floats and
  normalised last; both are affine per channel, so the order does not change the result."""
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  augmentation: Augmentation | None = None
  seed: int = 0

  def evaluation(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with `pixel_values` normalised (unchanged when it has no photos)."""
    if "pixel_values" not in batch:
      return batch
    return {**batch, "pixel_values": normalise(batch["pixel_values"], self.mean, self.std)}

  def training(self, batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    """The batch of training step `step` (0-based) augmented, then normalised."""
    if "pixel_values" not in batch:
      return batch
    pixels = batch["pixel_values"]
    if self.augmentation is not None:
      draws = self.augmentation.draws(self.seed, step, pixels.shape[0])
      pixels = self.augmentation(pixels.astype(jnp.float32), draws)
    return {**batch, "pixel_values": normalise(pixels, self.mean, self.std)}
