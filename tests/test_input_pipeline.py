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

  plain, flipped = pixels(0, 6, None), pixels(0, 6, input_pipeline.random_flip)
  for resumed, uninterrupted in zip(pixels(3, 3, input_pipeline.random_flip), flipped[3:]):
    np.testing.assert_array_equal(resumed, uninterrupted)
  rows = [(p, f) for batch_plain, batch_flipped in zip(plain, flipped)
          for p, f in zip(batch_plain, batch_flipped)]
  mirrored = [np.array_equal(f, p[:, ::-1]) for p, f in rows]
  assert all(m or np.array_equal(f, p) for m, (p, f) in zip(mirrored, rows))
  assert 0 < sum(mirrored) < len(rows)
