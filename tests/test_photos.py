"""Device-side photo preprocessing: normalisation equal to the host's, crops and flips that keep
colour, and augmentation that is a function of (seed, step) and the row alone."""

import jax
import jax.numpy as jnp
import numpy as np

from jmmshap import parallel, photos


def test_device_normalisation_equals_the_host_version():
  pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
  for mean, std in ((photos.IMAGENET_MEAN, photos.IMAGENET_STD), (photos.CLIP_MEAN, photos.CLIP_STD)):
    device = np.asarray(jax.jit(photos.normalise, static_argnums=(1, 2))(pixels, mean, std))
    host = photos.normalise_on_host(pixels, mean, std)
    assert device.dtype == np.float32
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
    np.testing.assert_allclose(host[1, 2, 3], (pixels[1, 2, 3] / 255 - np.asarray(mean)) /
                               np.asarray(std), atol=1e-6)


def _ramps(count, size=16):
  """Photos whose channel 0 is the column index, channel 1 the row index, channel 2 the photo's
  number: bilinear sampling reproduces a linear ramp, so a crop's box can be read off its pixels."""
  rows, columns = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.stack([np.stack([columns, rows, np.full_like(rows, i)], -1) for i in range(count)]
                  ).astype(np.float32)


def test_random_resized_crops_cover_the_configured_area_and_aspect_inside_the_photo():
  size, count = 16, 400
  images = _ramps(count, size)
  draws = np.random.default_rng(0).random((count, 4))
  crops = photos.random_resized_crop(images, draws, area=(0.3, 0.9), aspect_ratio=(0.5, 2.0))
  assert crops.shape == images.shape and crops.dtype == np.float32
  np.testing.assert_allclose(crops[..., 2], images[..., 2], rtol=1e-6)  # No mixing across photos.
  # Interior pixels (away from the clamped borders) lie on a plane: its slopes are the box's sides
  # over the photo's, its offset the box's corner.
  inner = slice(4, size - 4)
  width = (crops[:, 8, inner, 0][:, -1] - crops[:, 8, inner, 0][:, 0]) / (size - 9) * size
  height = (crops[:, inner, 8, 1][:, -1] - crops[:, inner, 8, 1][:, 0]) / (size - 9) * size
  left = crops[:, 8, 4, 0] - (4.5 * width / size - 0.5)
  top = crops[:, 4, 8, 1] - (4.5 * height / size - 0.5)
  area, ratio = width * height / size ** 2, width / height
  tolerance = 1e-4
  assert np.all(area >= 0.3 - tolerance) and np.all(area <= 0.9 + tolerance)
  assert np.all(ratio >= 0.5 - tolerance) and np.all(ratio <= 2.0 + tolerance)
  assert np.all(left >= -tolerance) and np.all(left + width <= size + tolerance)
  assert np.all(top >= -tolerance) and np.all(top + height <= size + tolerance)
  # The draws decide it: the area is uniform over its range (where no side was clipped to the
  # photo's), the ratio log-uniform, the position spread over the free room.
  unclipped = (width < size - 1e-3) & (height < size - 1e-3)
  assert unclipped.mean() > 0.6
  np.testing.assert_allclose(area[unclipped], 0.3 + 0.6 * draws[unclipped, 0], atol=1e-4)
  np.testing.assert_allclose(np.log(ratio[unclipped]), np.log(0.5) + np.log(4) * draws[unclipped, 1],
                             atol=1e-3)
  room = (size - width > 1) & (size - height > 1)
  np.testing.assert_allclose(left[room] / (size - width[room]), draws[room, 2], atol=1e-3)
  np.testing.assert_allclose(top[room] / (size - height[room]), draws[room, 3], atol=1e-3)


def test_a_crop_of_the_whole_photo_is_the_photo_and_colours_are_kept():
  images = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
  draws = np.random.default_rng(2).random((3, 4))
  whole = photos.random_resized_crop(images, draws, area=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
  np.testing.assert_allclose(whole, images, atol=1e-6)
  plain = np.broadcast_to(np.asarray([0.2, -1.0, 0.7], np.float32), (3, 8, 8, 3))
  crops = photos.random_resized_crop(plain, draws, area=(0.1, 0.5), aspect_ratio=(0.5, 2.0))
  np.testing.assert_allclose(crops, plain, atol=1e-6)  # A one-colour photo stays that colour.


def _half_lit(count, size=8):
  """uint8 photos whose left half is lit and right half black: a mirror image differs."""
  images = np.zeros((count, size, size, 3), np.uint8)
  images[:, :, :size // 2] = (10 * np.arange(1, count + 1))[:, None, None, None]
  return images


def test_flips_mirror_about_half_the_rows_and_nothing_else():
  images = jnp.asarray(_half_lit(64))
  draws = jax.random.uniform(jax.random.key(0), (64,))
  flipped = np.asarray(photos.random_flip(images, draws))
  mirrored = np.asarray(draws) < 0.5
  np.testing.assert_array_equal(flipped[mirrored], np.asarray(images)[mirrored][:, :, ::-1])
  np.testing.assert_array_equal(flipped[~mirrored], np.asarray(images)[~mirrored])
  assert 0 < mirrored.sum() < 64


def _augmented(transform, images, step, mesh=None):
  batch = {"pixel_values": jnp.asarray(images)}
  if mesh is not None:
    batch = parallel.to_global({"pixel_values": images}, mesh)
  run = jax.jit(transform.training)
  return np.asarray(run(batch, jnp.asarray(step, jnp.int32))["pixel_values"])


def test_augmentation_is_a_function_of_seed_and_step_whatever_the_sharding():
  images = np.random.default_rng(3).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  both = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True, crop_area=(0.3, 0.8)),
                               seed=7)
  one_device = _augmented(both, images, 5)
  np.testing.assert_array_equal(_augmented(both, images, 5), one_device)  # Same (seed, step).
  # Split over the two devices' rows: each row draws what it drew on one device.
  np.testing.assert_allclose(_augmented(both, images, 5, parallel.make_mesh()), one_device,
                             atol=1e-5)
  assert not np.allclose(_augmented(both, images, 6), one_device, atol=1e-3)  # Another step.
  other_seed = photos.PhotoTransform(augmentation=both.augmentation, seed=8)
  assert not np.allclose(_augmented(other_seed, images, 5), one_device, atol=1e-3)
  # A row's crops do not depend on the other rows of the batch.
  np.testing.assert_allclose(_augmented(both, images[:4], 5), one_device[:4], atol=1e-5)


def test_flips_read_the_same_draw_with_or_without_crops():
  images = np.random.default_rng(4).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  crop = photos.PhotoTransform(augmentation=photos.Augmentation(crop_area=(0.3, 0.8)), seed=7)
  both = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True, crop_area=(0.3, 0.8)),
                               seed=7)
  flip = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True), seed=7)
  plain = photos.PhotoTransform(seed=7)
  cropped, crossed = _augmented(crop, images, 2), _augmented(both, images, 2)
  flipped, unchanged = _augmented(flip, images, 2), _augmented(plain, images, 2)
  assert not np.allclose(cropped, unchanged, atol=1e-3)
  mirrored = [not np.array_equal(f, p) for f, p in zip(flipped, unchanged)]
  assert 0 < sum(mirrored) < len(images)
  for c, x, m in zip(cropped, crossed, mirrored):
    np.testing.assert_allclose(x, c[:, ::-1] if m else c, atol=1e-6)


def test_evaluation_only_normalises():
  images = np.random.default_rng(5).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  transform = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True, crop_area=(0.3, 0.5)))
  evaluated = np.asarray(transform.evaluation({"pixel_values": jnp.asarray(images)})["pixel_values"])
  np.testing.assert_allclose(evaluated, photos.normalise_on_host(images, transform.mean,
                                                                 transform.std), atol=1e-6)
  assert transform.evaluation({"input_ids": 1}) == {"input_ids": 1}
