import io
import itertools
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from jmmshap import input_pipeline, parallel
from jmmshap.tokenizer import TitleTokenizer


def _encoded(image):
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _png(colour, size=(10, 12)):
  return _encoded(Image.new("RGB", size, colour))


@pytest.fixture(scope="module")
def source():
  return [{"id": f"p{i}", "title": f"red mug number {i}".encode(), "image": _png((i, 2 * i, 3 * i)),
           "label": i % 3} for i in range(23)]


@pytest.fixture(scope="module")
def preprocess(source):
  tokenizer = TitleTokenizer.train([r["title"].decode() for r in source], vocab_size=100,
                                   max_length=8)
  return input_pipeline.Preprocessor(tokenizer, image_size=8, image_mean=(0.5, 0.5, 0.5),
                                     image_std=(0.5, 0.5, 0.5))


def test_preprocessor_resizes_normalises_and_tokenises(source, preprocess):
  batch = preprocess(source[:4])
  assert batch["pixel_values"].shape == (4, 8, 8, 3) and batch["pixel_values"].dtype == np.float32
  np.testing.assert_allclose(batch["pixel_values"][3, 0, 0], (np.array([3, 6, 9]) / 255 - 0.5) / 0.5,
                             atol=1e-6)
  assert batch["input_ids"].shape == (4, 8)
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 0])
  np.testing.assert_array_equal(batch["id"], ["p0", "p1", "p2", "p3"])


def test_train_batches_are_seeded_and_resume_at_any_step(source, preprocess):
  def ids(start_step, steps, seed=7):
    batches = input_pipeline.train_batches(source, preprocess, global_batch_size=4, seed=seed,
                                           start_step=start_step)
    return [list(b["id"]) for b in itertools.islice(batches, steps)]

  uninterrupted = ids(0, 12)  # 5 steps per epoch: crosses two epoch boundaries.
  assert ids(0, 12) == uninterrupted
  assert ids(7, 5) == uninterrupted[7:]
  assert ids(0, 12, seed=8) != uninterrupted
  first_epoch = sum(uninterrupted[:5], [])
  assert len(set(first_epoch)) == 20  # No repeats within an epoch; the 3 left over are dropped.
  assert uninterrupted[:5] != uninterrupted[5:10]  # Reshuffled per epoch.


def test_eval_batches_count_every_example_once(source, preprocess):
  batches = list(input_pipeline.eval_batches(source, preprocess, global_batch_size=10))
  assert [len(b["mask"]) for b in batches] == [10, 10, 10]
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask == 1], np.arange(23))
  assert np.all(index[mask == 0] == -1) and mask.sum() == 23


def test_too_small_training_split_is_a_clear_error(source, preprocess):
  with pytest.raises(ValueError, match="fewer than one batch"):
    next(input_pipeline.train_batches(source, preprocess, global_batch_size=64, seed=0))


def test_prefetch_keeps_order_and_reraises_producer_errors():
  assert list(input_pipeline.prefetch(iter(range(10)), size=2)) == list(range(10))

  def failing():
    yield 1
    raise OSError("disk gone")

  with pytest.raises(OSError, match="disk gone"):
    list(input_pipeline.prefetch(failing()))


def test_closing_a_prefetch_early_stops_its_thread_before_returning():
  def endless():
    i = 0
    while True:
      yield i
      i += 1

  before = set(threading.enumerate())
  batches = input_pipeline.prefetch(endless(), size=2)
  assert [next(batches) for _ in range(3)] == [0, 1, 2]
  assert len(set(threading.enumerate()) - before) == 1  # The producer, its queue full.
  batches.close()
  assert set(threading.enumerate()) - before == set()  # Joined, not left running.


def test_batches_are_sharded_over_the_data_axis(source, preprocess):
  assert jax.device_count() == 2
  mesh = parallel.make_mesh()
  batch = parallel.to_global(preprocess(source[:4]), mesh)
  assert "id" not in batch
  assert batch["pixel_values"].sharding.spec == parallel.data_sharded(mesh).spec
  assert {s.data.shape[0] for s in batch["input_ids"].addressable_shards} == {2}


def test_batch_size_must_split_over_devices():
  with pytest.raises(ValueError, match="multiple of 2"):
    parallel.check_batch_size(5)


def test_prefetch_applies_the_transform_in_order_and_passes_errors_on():
  batches = iter([{"x": np.full(2, i)} for i in range(5)])
  moved = list(input_pipeline.prefetch(batches, transform=lambda b: b["x"].sum()))
  assert moved == [0, 2, 4, 6, 8]

  def failing():
    yield {"x": np.zeros(2)}
    raise OSError("disk gone")
  with pytest.raises(OSError, match="disk gone"):
    list(input_pipeline.prefetch(failing(), transform=lambda b: b))


def test_random_flip_mirrors_the_same_rows_on_resume(preprocess):
  def half_lit(i):  # Left half coloured, right half black: mirroring changes it.
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    image.paste((10 * i, 5, 5), (0, 0, 4, 8))
    return _encoded(image)

  photos = [{"id": f"p{i}", "title": b"mug", "image": half_lit(i), "label": 0} for i in range(12)]

  def pixels(start_step, steps, augment):
    batches = input_pipeline.train_batches(photos, preprocess, global_batch_size=4, seed=7,
                                           start_step=start_step, augment=augment)
    return [b["pixel_values"] for b in itertools.islice(batches, steps)]

  flip = input_pipeline.Augmentation(flip=True)
  plain, flipped = pixels(0, 6, None), pixels(0, 6, flip)
  for resumed, uninterrupted in zip(pixels(3, 3, flip), flipped[3:]):
    np.testing.assert_array_equal(resumed, uninterrupted)
  rows = [(p, f) for batch_plain, batch_flipped in zip(plain, flipped)
          for p, f in zip(batch_plain, batch_flipped)]
  mirrored = [np.array_equal(f, p[:, ::-1]) for p, f in rows]
  assert all(m or np.array_equal(f, p) for m, (p, f) in zip(mirrored, rows))
  assert 0 < sum(mirrored) < len(rows)


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
  crops = input_pipeline.random_resized_crop(images, draws, area=(0.3, 0.9), aspect_ratio=(0.5, 2.0))
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
  whole = input_pipeline.random_resized_crop(images, draws, area=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
  np.testing.assert_allclose(whole, images, atol=1e-6)
  plain = np.broadcast_to(np.asarray([0.2, -1.0, 0.7], np.float32), (3, 8, 8, 3))
  crops = input_pipeline.random_resized_crop(plain, draws, area=(0.1, 0.5), aspect_ratio=(0.5, 2.0))
  np.testing.assert_allclose(crops, plain, atol=1e-6)  # A one-colour photo stays that colour.


def test_random_crops_are_seeded_per_step_and_the_same_on_resume(preprocess):
  photos = [{"id": f"p{i}", "title": b"mug", "image": _encoded(Image.fromarray(
      np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8))), "label": 0}
            for i in range(12)]
  crop = input_pipeline.Augmentation(crop_area=(0.3, 0.8))
  both = input_pipeline.Augmentation(flip=True, crop_area=(0.3, 0.8))

  def pixels(start_step, steps, augment, seed=7):
    batches = input_pipeline.train_batches(photos, preprocess, global_batch_size=4, seed=seed,
                                           start_step=start_step, augment=augment)
    return [b["pixel_values"] for b in itertools.islice(batches, steps)]

  plain, cropped = pixels(0, 6, None), pixels(0, 6, crop)
  np.testing.assert_array_equal(pixels(0, 6, crop)[5], cropped[5])  # Same (seed, step): same crops.
  for resumed, uninterrupted in zip(pixels(3, 3, crop), cropped[3:]):
    np.testing.assert_array_equal(resumed, uninterrupted)
  assert not np.allclose(pixels(0, 1, crop, seed=8)[0], pixels(0, 1, None, seed=8)[0])
  assert not np.allclose(pixels(0, 1, crop, seed=8)[0], cropped[0])  # Another seed, other crops.
  assert all(not np.allclose(c, p, atol=1e-3) for c, p in zip(cropped, plain))
  # The same photo (epochs 0 and 1 of 3 steps each) is cropped differently at another step.
  ids = [list(b["id"]) for b in itertools.islice(input_pipeline.train_batches(
      photos, preprocess, global_batch_size=4, seed=7), 6)]
  first, second = sum(ids[:3], []), sum(ids[3:], [])
  flat_plain, flat_cropped = np.concatenate(plain), np.concatenate(cropped)
  for row, photo in enumerate(first):
    again = second.index(photo) + 12
    np.testing.assert_array_equal(flat_plain[row], flat_plain[again])
    assert not np.allclose(flat_cropped[row], flat_cropped[again], atol=1e-3)
  # Flips read the same draws with or without crops: flipping is a mirror of the crop.
  crossed = pixels(0, 6, both)
  flipped = pixels(0, 6, input_pipeline.Augmentation(flip=True))
  for c, x, f, p in zip(np.concatenate(cropped), np.concatenate(crossed), np.concatenate(flipped),
                        np.concatenate(plain)):
    mirrored = not np.array_equal(f, p)
    np.testing.assert_array_equal(x, c[:, ::-1] if mirrored else c)
