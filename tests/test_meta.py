"""The MM-SHAP-weighted stacked ensemble: weighting arithmetic, bad inputs, train/eval, the pipeline."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import meta as meta_configs
from jmmshap import meta, metrics, stages

CLASS_NAMES = ("lamp", "mug", "design/red-circle", "design/blue-square")


def _write_logits(workdir, learner, split, logits, labels, ids, class_names=CLASS_NAMES):
  directory = os.path.join(workdir, learner)
  os.makedirs(directory, exist_ok=True)
  np.savez(os.path.join(directory, f"logits_{split}.npz"), logits=np.asarray(logits, np.float32),
           labels=np.asarray(labels, np.int32), ids=np.asarray(ids), class_names=np.asarray(class_names))


def _write_shares(workdir, split, ids, t_shap, class_names=CLASS_NAMES):
  directory = os.path.join(workdir, "mmshap")
  os.makedirs(directory, exist_ok=True)
  t_shap = np.asarray(t_shap, np.float64)
  np.savez(os.path.join(directory, f"mmshap_{split}.npz"), ids=np.asarray(ids), t_shap=t_shap,
           v_shap=1 - t_shap, class_names=np.asarray(class_names))


def _fake_workdir(workdir, *, per_class=(6, 5), seed=0):
  """Base learners each right on their own classes: text on 0-1, image on 2-3, mmbt on most."""
  rng = np.random.default_rng(seed)
  num_classes = len(CLASS_NAMES)
  for split, count in zip(meta.SPLITS, per_class, strict=True):
    labels = np.repeat(np.arange(num_classes), count)
    ids = np.asarray([f"{split}-{i}" for i in range(len(labels))])
    onehot = np.eye(num_classes)[labels]
    text = 4 * onehot * (labels < 2)[:, None] + rng.normal(size=onehot.shape)
    image = 4 * onehot * (labels >= 2)[:, None] + rng.normal(size=onehot.shape)
    mmbt = 2 * onehot + rng.normal(size=onehot.shape)
    for learner, logits in (("text", text), ("image", image), ("mmbt", mmbt)):
      _write_logits(workdir, learner, split, logits, labels, ids)
    _write_shares(workdir, split, ids, np.where(labels < 2, 0.8, 0.3))
  return workdir


def _config(**meta_overrides):
  config = meta_configs.get_config("toyshop")
  config.meta.update(hidden_size=16, num_steps=40, eval_every_steps=20, checkpoint_every_steps=20,
                     log_every_steps=10)
  config.meta.update(meta_overrides)
  return config


@pytest.mark.parametrize("variant",
                         ["toyshop", "fashion", "fashion_sub", "taimd17k", "taimd17k,paper"])
def test_meta_config_loads_in_every_variant_with_one_shared_data_config(variant):
  config = meta_configs.get_config(variant)
  pretrains = variant.startswith("fashion")  # Their MMBT starts from the clip_pretrain stage's tower.
  assert config.stage == "meta" and set(config.stages.keys()) == (
      set(meta.UPSTREAM) - (set() if pretrains else {"clip_pretrain"}))
  config.data.data_dir = "/elsewhere"
  for name in config.stages:
    assert config.stages[name].data.data_dir == "/elsewhere"
  assert config.stages.mmbt.data.image_size == config.data.image_size
  if variant.endswith("paper"):
    assert (config.meta.optimizer.name, config.meta.optimizer.learning_rate,
            config.meta.num_steps, config.meta.hidden_size) == ("sgd", 1e-4, 50_000, 512)
  with pytest.raises(ValueError, match="unknown options"):
    meta_configs.get_config("toyshop,huge")

# --------------------------------------------------------------------------------------------------
# Weighting arithmetic.


def test_weighted_features_scale_text_by_t_shap_image_by_v_shap_and_mmbt_by_its_weight():
  logits = {"text": np.asarray([[1.0, 2.0], [3.0, 4.0]]), "image": np.asarray([[10.0, 20.0],
                                                                                [30.0, 40.0]]),
            "mmbt": np.asarray([[5.0, 6.0], [7.0, 8.0]])}
  features = meta.weighted_features(logits, np.asarray([0.25, 1.0]), np.asarray([0.75, 0.0]),
                                    mmbt_weight=2.0, append_shares=True)
  np.testing.assert_allclose(features, [[0.25, 0.5, 7.5, 15.0, 10.0, 12.0, 0.25, 0.75],
                                        [3.0, 4.0, 0.0, 0.0, 14.0, 16.0, 1.0, 0.0]])
  plain = meta.weighted_features(logits, 1.0, 1.0)
  np.testing.assert_array_equal(plain, np.concatenate([logits["text"], logits["image"],
                                                       logits["mmbt"]], axis=1))


def test_dataset_weighting_uses_validation_mean_shares_on_every_split(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  outputs = {split: meta.load_base_outputs(workdir, split) for split in meta.SPLITS}
  shares = {split: meta.load_shares(workdir, outputs[split]) for split in meta.SPLITS}
  data = meta.method_data(outputs, shares, "dataset", _config().meta)
  labels = outputs["validation"].labels
  t_mean = np.where(labels < 2, 0.8, 0.3).mean()
  assert data.shares["dataset_t_shap"] == pytest.approx(t_mean)
  for split in meta.SPLITS:
    logits = outputs[split].logits
    np.testing.assert_allclose(data.features[split][:, :4], t_mean * logits["text"], rtol=1e-6)
    np.testing.assert_allclose(data.features[split][:, 4:8], (1 - t_mean) * logits["image"],
                               rtol=1e-6)
    np.testing.assert_array_equal(data.features[split][:, 8:], logits["mmbt"])


def test_sample_weighting_uses_each_examples_shares_and_dataset_shares_where_undefined(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  outputs = {split: meta.load_base_outputs(workdir, split) for split in meta.SPLITS}
  t_shap = np.linspace(0.1, 0.9, len(outputs["test"].ids))
  t_shap[3] = np.nan  # Every Shapley value 0: T-SHAP is 0/0.
  _write_shares(workdir, "test", outputs["test"].ids, t_shap)
  shares = {split: meta.load_shares(workdir, outputs[split]) for split in meta.SPLITS}
  data = meta.method_data(outputs, shares, "sample", _config(append_shares=True).meta)
  features = data.features["test"]
  expected_t = np.where(np.isnan(t_shap), data.shares["dataset_t_shap"], t_shap)
  np.testing.assert_allclose(features[:, 0], expected_t * outputs["test"].logits["text"][:, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(features[:, -2:], np.stack([expected_t, 1 - expected_t], 1), rtol=1e-6)
  assert data.shares["undefined_test"] == 1 and data.shares["undefined_validation"] == 0


def test_cross_fit_holds_every_validation_example_out_exactly_once_with_balanced_classes():
  labels = np.repeat(np.arange(4), 5)
  config = _config(cross_fit=3).meta
  train, holdout = meta.member_masks(labels, config, seed=0)
  assert train.shape == holdout.shape == (3, 20)
  np.testing.assert_array_equal(holdout.sum(axis=0), 1)
  np.testing.assert_array_equal(train, ~holdout)
  assert sorted(holdout.sum(axis=1)) == [6, 7, 7]
  for member in holdout:  # Every class appears in every fold's training part.
    assert set(labels[~member]) == set(range(4))



def test_early_stopping_holds_out_a_stratified_fraction_of_validation():
  labels = np.repeat(np.arange(4), 10)
  train, holdout = meta.member_masks(labels, _config(early_stopping=True, holdout_fraction=0.2).meta,
                                     seed=0)
  assert train.shape == holdout.shape == (1, 40)
  np.testing.assert_array_equal(np.bincount(labels[holdout[0]]), [2, 2, 2, 2])
  np.testing.assert_array_equal(train, ~holdout)
  plain_train, plain_holdout = meta.member_masks(labels, _config().meta, seed=0)
  assert plain_train.all() and not plain_holdout.any()  # The paper: all of validation.

# --------------------------------------------------------------------------------------------------
# Bad inputs.


def test_base_learners_with_different_class_counts_name_both_files(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  data = np.load(os.path.join(workdir, "image", "logits_test.npz"))
  _write_logits(workdir, "image", "test", data["logits"][:, :3], data["labels"], data["ids"],
                CLASS_NAMES[:3])
  with pytest.raises(ValueError, match=r"image/logits_test.npz has 3 classes .*/text/logits_test"
                                       r".npz has 4"):
    meta.load_base_outputs(workdir, "test")


def test_base_learners_with_another_label_order_are_refused(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  data = np.load(os.path.join(workdir, "mmbt", "logits_validation.npz"))
  swapped = (CLASS_NAMES[1], CLASS_NAMES[0], *CLASS_NAMES[2:])
  _write_logits(workdir, "mmbt", "validation", data["logits"], data["labels"], data["ids"], swapped)
  with pytest.raises(ValueError, match=r"mmbt/logits_validation.npz and .*text/logits_validation.npz "
                                       r"list the same classes in a different order \(index 0"):
    meta.load_base_outputs(workdir, "validation")


def test_ids_in_another_order_are_aligned_but_other_ids_are_refused(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  data = dict(np.load(os.path.join(workdir, "image", "logits_test.npz")))
  order = np.random.default_rng(1).permutation(len(data["ids"]))
  _write_logits(workdir, "image", "test", data["logits"][order], data["labels"][order],
                data["ids"][order])
  outputs = meta.load_base_outputs(workdir, "test")
  np.testing.assert_array_equal(outputs.logits["image"], data["logits"])
  ids = data["ids"].copy()
  ids[2] = "someone-else"
  _write_logits(workdir, "image", "test", data["logits"], data["labels"], ids)
  with pytest.raises(ValueError, match=r"image/logits_test.npz and .*text/logits_test.npz do not "
                                       r"hold the same examples: 1 ids .* \('test-2'\)"):
    meta.load_base_outputs(workdir, "test")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_logits_name_the_file_row_and_id(tmp_path, bad_value):
  workdir = _fake_workdir(str(tmp_path))
  data = dict(np.load(os.path.join(workdir, "text", "logits_validation.npz")))
  data["logits"][5, 1] = bad_value
  _write_logits(workdir, "text", "validation", data["logits"], data["labels"], data["ids"])
  with pytest.raises(ValueError, match=r"text/logits_validation.npz: 1 of 24 rows of logits are NaN "
                                       r"or infinite \(first: row 5, id 'validation-5'\)"):
    meta.load_base_outputs(workdir, "validation")


def test_sample_weighting_without_every_examples_shares_says_how_to_get_them(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  outputs = {split: meta.load_base_outputs(workdir, split) for split in meta.SPLITS}
  ids = outputs["test"].ids[:8]  # As if mmshap ran with max_examples=8.
  _write_shares(workdir, "test", ids, np.full(len(ids), 0.5))
  shares = {split: meta.load_shares(workdir, outputs[split]) for split in meta.SPLITS}
  meta.method_data(outputs, shares, "dataset", _config().meta)  # The mean needs no full coverage.
  with pytest.raises(ValueError, match=r"mmshap_test.npz has MM-SHAP for 8 of 20 test examples .*"
                                       r"max_examples=0 .*drop 'sample'"):
    meta.method_data(outputs, shares, "sample", _config().meta)


def test_shares_of_examples_the_learners_never_saw_are_refused(tmp_path):
  workdir = _fake_workdir(str(tmp_path))
  outputs = meta.load_base_outputs(workdir, "validation")
  _write_shares(workdir, "validation", ["elsewhere-1", *outputs.ids[1:]], np.full(24, 0.5))
  with pytest.raises(ValueError, match=r"mmshap_validation.npz explains 1 examples that .*mmbt/"
                                       r"logits_validation.npz does not hold \('elsewhere-1'\)"):
    meta.load_shares(workdir, outputs)


def test_unknown_weighting_and_rerun_names_are_refused():
  with pytest.raises(ValueError, match="meta.weighting='none,modality'"):
    meta.parse_weightings("none,modality")
  with pytest.raises(ValueError, match=r"unknown stage\(s\) bert"):
    meta.parse_rerun("text,bert")


# --------------------------------------------------------------------------------------------------
# Train, restore, evaluate.


def _cross_fit_config(mode="train"):
  config = _config(cross_fit=3, early_stopping=True, patience=1)
  config.mode = mode
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = _fake_workdir(str(tmp_path_factory.mktemp("meta_synthetic")))
  report = meta.evaluate_methods(workdir, _cross_fit_config())
  return workdir, report


def test_training_writes_every_method_report_curves_and_checkpoints(trained):
  workdir, report = trained
  directory = os.path.join(workdir, "meta")
  assert list(report["methods"]) == ["text", "image", "mmbt", "average", "stacked",
                                     "mmshap_dataset", "mmshap_sample"]
  for scores in report["methods"].values():
    assert set(scores) == set(metrics.METRIC_NAMES)
  with open(os.path.join(directory, "metrics.json")) as f:
    assert json.load(f) == report
  outputs = meta.load_base_outputs(workdir, "test")
  for learner in meta.LEARNERS:  # The base learners' rows are their own test predictions.
    assert report["methods"][learner] == metrics.classification_metrics(
        outputs.labels, outputs.logits[learner].argmax(-1), 4)
  with open(os.path.join(directory, "training.json")) as f:
    training = json.load(f)
  for method in ("stacked", "mmshap_dataset", "mmshap_sample"):
    assert training[method]["members"] == 3
    assert training[method]["held_out_validation"]["examples"] == 24  # Out-of-fold: all of it.
    assert all(0 < step <= 40 for step in training[method]["kept_steps"])
    for name in ("log.jsonl", "loss.png", "accuracy.png"):
      assert os.path.getsize(os.path.join(directory, method, name)) > 0
  with open(os.path.join(directory, "report.md")) as f:
    text = f.read()
  assert "| mmshap_sample |" in text or "| **mmshap_sample** |" in text
  assert "T-SHAP" in text and "Per-class F1" in text
  assert os.path.getsize(os.path.join(directory, "confusion_matrix.png")) > 0


def test_eval_mode_restores_the_checkpoints_and_reproduces_the_test_metrics_exactly(trained):
  workdir, report = trained
  assert meta.evaluate_methods(workdir, _cross_fit_config("eval")) == report


def _test_probabilities(workdir, config, weighting):
  outputs = {split: meta.load_base_outputs(workdir, split) for split in meta.SPLITS}
  shares = {split: meta.load_shares(workdir, outputs[split]) for split in meta.SPLITS}
  data = meta.method_data(outputs, shares, weighting, config.meta)
  directory = os.path.join(workdir, "meta", data.method)
  predict, _ = meta.restore(data, config.meta, directory, config.seed, outputs["test"].class_names)
  return predict(data.features["test"])


def test_a_resumed_meta_training_ends_where_an_uninterrupted_one_does(trained, tmp_path):
  workdir, _ = trained
  config = _config(weighting="dataset")  # No early stopping: 40 steps, checkpoints at 20 and 40.
  straight = str(tmp_path / "straight")
  shutil.copytree(workdir, straight, ignore=shutil.ignore_patterns("meta"))
  meta.evaluate_methods(straight, config)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  # As if killed right after the step-20 checkpoint.
  shutil.rmtree(os.path.join(resumed, "meta", "mmshap_dataset", "checkpoints", "40"))
  meta.evaluate_methods(resumed, config)
  np.testing.assert_array_equal(_test_probabilities(resumed, config, "dataset"),
                                _test_probabilities(straight, config, "dataset"))
  with open(os.path.join(resumed, "meta", "mmshap_dataset", "log.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [10, 20, 30, 40]


def test_a_meta_checkpoint_for_another_class_count_is_refused(trained, tmp_path):
  workdir, _ = trained
  other = str(tmp_path / "three_classes")
  shutil.copytree(os.path.join(workdir, "meta"), os.path.join(other, "meta"))
  rng = np.random.default_rng(0)
  for split, count in zip(meta.SPLITS, (24, 20), strict=True):
    labels = np.arange(count) % 3
    ids = [f"{split}-{i}" for i in range(count)]
    for learner in meta.LEARNERS:
      _write_logits(other, learner, split, rng.normal(size=(count, 3)), labels, ids, CLASS_NAMES[:3])
    _write_shares(other, split, ids, np.full(count, 0.5), CLASS_NAMES[:3])
  with pytest.raises(ValueError, match=r"stacked/checkpoints holds a meta-model for 4 classes .* have "
                                       r"3 .*belongs to another dataset"):
    meta.evaluate_methods(other, _cross_fit_config("eval"))


def test_eval_mode_refuses_a_checkpoint_trained_on_other_base_outputs(trained, tmp_path):
  workdir, _ = trained
  other = str(tmp_path / "retrained")
  shutil.copytree(os.path.join(workdir, "meta"), os.path.join(other, "meta"))
  _fake_workdir(other, seed=1)
  with pytest.raises(ValueError, match=r"stacked/checkpoints was trained on other meta-features .*"
                                       r"features_sha256"):
    meta.evaluate_methods(other, _cross_fit_config("eval"))



def test_eval_mode_with_other_training_settings_names_the_setting(trained):
  workdir, _ = trained
  config = _cross_fit_config("eval")
  config.meta.num_steps = 60
  with pytest.raises(ValueError, match=r"stacked/checkpoints was trained on other meta-features or "
                                       r"settings .*settings.num_steps: 40 -> 60"):
    meta.evaluate_methods(workdir, config)

# --------------------------------------------------------------------------------------------------
# The whole pipeline on a tiny toyshop.


def _tiny_pipeline_config(data_dir):
  config = meta_configs.get_config("toyshop")
  config.data.data_dir = data_dir  # One data config, shared by every stage.
  config.data.toyshop.update(train_per_class=4, validation_per_class=2, test_per_class=2)
  for name in ("text", "image", "mmbt"):
    config.stages[name].update(batch_size=16, eval_batch_size=16, total_steps=2, log_every_steps=1)
  config.stages.text.data.update(max_length=10, vocab_size=200)
  config.stages.text.model.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
  config.stages.image.model.width = 4
  config.stages.mmbt.data.max_length = 10
  config.stages.mmbt.model.bert.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32)
  config.stages.mmbt.model.clip.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, patch_size=16)
  config.stages.mmshap.update(max_text_players=2, examples_per_group=8)
  config.meta.update(hidden_size=16, num_steps=20, eval_every_steps=10, checkpoint_every_steps=20)
  return config


def test_the_main_job_runs_every_missing_stage_then_reuses_them(tmp_path_factory):
  root = tmp_path_factory.getbasetemp()
  config = _tiny_pipeline_config(str(root / "tfds_stages"))
  assert config.stages.mmbt.data.toyshop.validation_per_class == 2  # Shared, not copied.
  assert config.stages.image.data.data_dir == str(root / "tfds_stages")
  workdir = str(root / "workdir_meta")
  report = stages.run(config, workdir)
  assert list(report["methods"]) == ["text", "image", "mmbt", "average", "stacked",
                                     "mmshap_dataset", "mmshap_sample"]
  assert "clip_pretrain" not in config.stages  # Only the fashion variants pretrain a tower.
  for stage in config.stages:
    assert all(os.path.isfile(path) for path in meta.final_outputs(workdir, stage))
  with open(os.path.join(workdir, "mmbt", "metrics.json")) as f:
    mmbt_test = json.load(f)["test"]
  assert report["methods"]["mmbt"] == pytest.approx(mmbt_test)
  for name in ("metrics.json", "report.md", "confusion_matrix.png", "per_class_f1.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, "meta", name)) > 0

  assert meta.run_upstream(config, workdir) == []  # Everything finished is reused.
  config.stages.text.total_steps = 3
  with pytest.raises(ValueError, match=r"workdir_meta/text was trained with other settings .*"
                                       r"total_steps: 2 there, 3 now.*add text to --config.rerun"):
    meta.run_upstream(config, workdir)
