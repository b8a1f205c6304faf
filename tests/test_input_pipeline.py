"""The grain data path: uint8 batches, the seeded order, exact resume from grain's state,
per-process rows, worker processes that change nothing, and cheap decoding of large photos."""

import io
import itertools
import time

import jax
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from jmmshap import input_pipeline, parallel, photos
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


def test_preprocessor_resizes_to_uint8_and_tokenises(source, preprocess):
  batch = preprocess(source[:4])
  assert batch["pixel_values"].shape == (4, 8, 8, 3) and batch["pixel_values"].dtype == np.uint8
  np.testing.assert_array_equal(batch["pixel_values"][3, 0, 0], [3, 6, 9])
  np.testing.assert_allclose(preprocess.normalised(batch)["pixel_values"][3, 0, 0],
                             (np.array([3, 6, 9]) / 255 - 0.5) / 0.5, atol=1e-6)
  assert batch["input_ids"].shape == (4, 8)
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 0])
  np.testing.assert_array_equal(batch["id"], ["p0", "p1", "p2", "p3"])


def _batches(source, preprocess, order, start, stop, workers=0, batch_size=4):
  iterator = input_pipeline.loader(source, preprocess, order, global_batch_size=batch_size,
                                   start=start, stop=stop, worker_count=workers)
  try:
    return list(iterator)
  finally:
    iterator.close()


def test_train_order_is_seeded_reshuffled_per_epoch_and_starts_at_any_step(source, preprocess):
  def ids(start, stop, seed=7):
    order = input_pipeline.TrainOrder(len(source), 4, seed)
    return [list(b["id"]) for b in _batches(source, preprocess, order, start, stop)]

  uninterrupted = ids(0, 12)  # 5 steps per epoch: crosses two epoch boundaries.
  assert ids(0, 12) == uninterrupted
  assert ids(7, 12) == uninterrupted[7:]
  assert ids(0, 12, seed=8) != uninterrupted
  first_epoch = sum(uninterrupted[:5], [])
  assert len(set(first_epoch)) == 20  # No repeats within an epoch; the 3 left over are dropped.
  assert uninterrupted[:5] != uninterrupted[5:10]  # Reshuffled per epoch.
  expected = np.random.default_rng([7, 1]).permutation(23)[4:8]  # Step 6: epoch 1, position 1.
  assert uninterrupted[6] == [f"p{i}" for i in expected]


def test_a_restored_grain_state_resumes_at_the_next_batch(source, preprocess):
  order = input_pipeline.TrainOrder(len(source), 4, 7)
  uninterrupted = _batches(source, preprocess, order, 0, 10)
  first = input_pipeline.loader(source, preprocess, order, global_batch_size=4, start=0, stop=10)
  for _ in range(3):
    next(first)
  state = first.get_state()
  first.close()
  resumed = input_pipeline.loader(source, preprocess, order, global_batch_size=4, start=0, stop=10)
  resumed.set_state(state)
  try:
    rest = list(resumed)
  finally:
    resumed.close()
  assert len(rest) == 7
  for ours, theirs in zip(rest, uninterrupted[3:], strict=True):
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
    np.testing.assert_array_equal(ours["id"], theirs["id"])


def test_worker_processes_give_the_batches_of_the_main_process(source, preprocess, monkeypatch):
  """Two grain workers decode alternate batches; order and content are those of no workers, and
  the uint8 photos augmented on the device from (seed, step) are too. As process 1 of 2, so the
  workers too read only that process's rows."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  order = input_pipeline.TrainOrder(len(source), 4, 7)
  alone = _batches(source, preprocess, order, 2, 9)
  workers = _batches(source, preprocess, order, 2, 9, workers=2)
  assert all(len(batch["id"]) == 2 for batch in alone)
  assert [list(b["id"]) for b in alone] == [[f"p{i}" for i in order(step)[2:]] for step in range(2, 9)]
  transform = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True, crop_area=(0.3, 0.8)),
                                    seed=7)
  training = jax.jit(transform.training)
  for step, (ours, theirs) in enumerate(zip(workers, alone, strict=True), start=2):
    for name in ("pixel_values", "input_ids", "label", "id"):
      np.testing.assert_array_equal(ours[name], theirs[name])
    augmented = [np.asarray(training({"pixel_values": b["pixel_values"]}, np.int32(step))[
        "pixel_values"]) for b in (ours, theirs)]
    np.testing.assert_array_equal(*augmented)


def test_eval_batches_count_every_example_once(source, preprocess):
  batches = list(input_pipeline.eval_batches(source, preprocess, global_batch_size=10))
  assert [len(b["mask"]) for b in batches] == [10, 10, 10]
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask == 1], np.arange(23))
  assert np.all(index[mask == 0] == -1) and mask.sum() == 23
  full = list(input_pipeline.eval_batches(source, preprocess, global_batch_size=10,
                                          drop_remainder=True))
  assert [list(b["id"]) for b in full] == [[f"p{i}" for i in range(s, s + 10)] for s in (0, 10)]


def test_too_small_training_split_is_a_clear_error(source, preprocess):
  with pytest.raises(ValueError, match="fewer than one batch"):
    input_pipeline.TrainOrder(len(source), 64, 0)(0)


def test_large_jpegs_are_decoded_at_a_reduced_scale_to_the_same_picture(monkeypatch):
  """A 1,000 x 1,300 JPEG read at 64 px: PIL's draft decodes it at 1/8 scale; the result is the
  full decode resized within JPEG noise, at a fraction of the pixels decoded."""
  rows, columns = np.meshgrid(np.linspace(0, 1, 1300), np.linspace(0, 1, 1000), indexing="ij")
  picture = np.stack([rows, columns, (rows + columns) / 2], -1) * 255
  buffer = io.BytesIO()
  Image.fromarray(picture.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
  encoded = buffer.getvalue()
  with Image.open(io.BytesIO(encoded)) as image:
    image.draft("RGB", (64, 64))
    assert image.size == (125, 163)  # 1/8 of 1,000 x 1,300, still above 64 px.
  requested = []
  draft = JpegImagePlugin.JpegImageFile.draft
  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                      lambda image, mode, size: requested.append(size) or draft(image, mode, size))
  reduced = input_pipeline.decode_image(encoded, 64)
  assert requested == [(64, 64)]  # The decoder was asked for the reduced scale.
  with Image.open(io.BytesIO(encoded)) as image:
    full = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR))
  assert reduced.shape == (64, 64, 3) and reduced.dtype == np.uint8
  assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 2.0
  small = input_pipeline.decode_image(_png((1, 2, 3)), 8)  # Not a JPEG: decoded as it is.
  np.testing.assert_array_equal(small, np.broadcast_to([1, 2, 3], (8, 8, 3)))


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




def test_batches_read_ahead_of_a_slow_consumer_stay_few():
  """grain on its own reads up to 500 elements ahead; batches of photos would fill the memory of a
  process whose consumer (the step) is slower than its input. Here at most a handful are read."""
  source = [{"id": f"p{i}", "label": 0} for i in range(6400)]
  read = []

  def preprocess(records):
    read.append(len(records))
    return {"x": np.zeros((len(records), 8), np.uint8)}

  for threads in (1, 2):
    read.clear()
    batches = input_pipeline.loader(source, preprocess, input_pipeline.SplitOrder(6400, 64),
                                    global_batch_size=64, start=0, stop=100, read_threads=threads)
    try:
      next(batches)
      time.sleep(0.5)
      assert len(read) <= 4 + 2 * threads, (threads, len(read))
      assert len(list(batches)) == 99  # And all of them come, in the end.
    finally:
      batches.close()
