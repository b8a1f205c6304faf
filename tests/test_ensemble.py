"""The meta stage on a synthetic workdir: train, report, restore, resume, and refusals of
checkpoints that do not fit; stacking beats learners that are each right on some classes only, and
cross-fit members are averaged on test and scored out of fold on validation."""

import json
import os
import shutil

import numpy as np
import pytest

import fakes
from jmmshap import ensemble, learner_outputs, meta, metrics, weighting
from jmmshap.builders import EVAL_SPLITS

def _cross_fit_config(mode="train"):
  config = fakes.meta_config(cross_fit=3, early_stopping=True, patience=1)
  config.mode = mode
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = fakes.fake_workdir(str(tmp_path_factory.mktemp("meta_synthetic")))
  report = ensemble.evaluate_methods(workdir, _cross_fit_config())
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
  outputs = learner_outputs.load_base_outputs(workdir, "test")
  for learner in learner_outputs.LEARNERS:  # The base learners' rows are their own test predictions.
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
  assert ensemble.evaluate_methods(workdir, _cross_fit_config("eval")) == report


def _test_probabilities(workdir, config, name):
  outputs = {split: learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS}
  shares = {split: learner_outputs.load_shares(workdir, outputs[split]) for split in EVAL_SPLITS}
  data = weighting.method_data(outputs, shares, name, config.meta)
  directory = os.path.join(workdir, "meta", data.method)
  predict, _ = meta.restore(data, config.meta, directory, config.seed, outputs["test"].class_names)
  return predict(data.features["test"])


def test_a_resumed_meta_training_ends_where_an_uninterrupted_one_does(trained, tmp_path):
  workdir, _ = trained
  config = fakes.meta_config(weighting="dataset")  # No early stopping: 40 steps, checkpoints at 20 and 40.
  straight = str(tmp_path / "straight")
  shutil.copytree(workdir, straight, ignore=shutil.ignore_patterns("meta"))
  ensemble.evaluate_methods(straight, config)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  # As if killed right after the step-20 checkpoint.
  shutil.rmtree(os.path.join(resumed, "meta", "mmshap_dataset", "checkpoints", "40"))
  ensemble.evaluate_methods(resumed, config)
  np.testing.assert_array_equal(_test_probabilities(resumed, config, "dataset"),
                                _test_probabilities(straight, config, "dataset"))
  with open(os.path.join(resumed, "meta", "mmshap_dataset", "log.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [10, 20, 30, 40]


def test_a_meta_checkpoint_for_another_class_count_is_refused(trained, tmp_path):
  workdir, _ = trained
  other = str(tmp_path / "three_classes")
  shutil.copytree(os.path.join(workdir, "meta"), os.path.join(other, "meta"))
  rng = np.random.default_rng(0)
  for split, count in zip(EVAL_SPLITS, (24, 20), strict=True):
    labels = np.arange(count) % 3
    ids = [f"{split}-{i}" for i in range(count)]
    for learner in learner_outputs.LEARNERS:
      fakes.write_logits(other, learner, split, rng.normal(size=(count, 3)), labels, ids, fakes.CLASS_NAMES[:3])
    fakes.write_shares(other, split, ids, np.full(count, 0.5), fakes.CLASS_NAMES[:3])
  with pytest.raises(ValueError, match=r"stacked/checkpoints holds a meta-model for 4 classes .* have "
                                       r"3 .*belongs to another dataset"):
    ensemble.evaluate_methods(other, _cross_fit_config("eval"))


def test_eval_mode_refuses_a_checkpoint_trained_on_other_base_outputs(trained, tmp_path):
  workdir, _ = trained
  other = str(tmp_path / "retrained")
  shutil.copytree(os.path.join(workdir, "meta"), os.path.join(other, "meta"))
  fakes.fake_workdir(other, seed=1)
  with pytest.raises(ValueError, match=r"stacked/checkpoints was trained on other meta-features .*"
                                       r"features_sha256"):
    ensemble.evaluate_methods(other, _cross_fit_config("eval"))



def test_eval_mode_with_other_training_settings_names_the_setting(trained):
  workdir, _ = trained
  config = _cross_fit_config("eval")
  config.meta.num_steps = 60
  with pytest.raises(ValueError, match=r"stacked/checkpoints was trained on other meta-features or "
                                       r"settings .*settings.num_steps: 40 -> 60"):
    ensemble.evaluate_methods(workdir, config)


# --------------------------------------------------------------------------------------------------
# What the meta-models are worth, and how their members are combined.


@pytest.fixture(scope="module")
def complementary(tmp_path_factory):
  """Each base learner right on two of the four classes only (text 0-1, image 2-3, mmbt 1-2)."""
  workdir = fakes.fake_workdir(str(tmp_path_factory.mktemp("complementary")), per_class=(20, 20),
                               mmbt_classes=(1, 2))
  config = fakes.meta_config()
  config.meta.optimizer.learning_rate = 1e-2
  return ensemble.evaluate_methods(workdir, config)


def test_stacking_and_mmshap_weighting_beat_every_base_learner_when_each_is_right_on_some_classes(
    complementary):
  """Only a meta-model that learned which learner to trust for which class can be right on all."""
  scores = complementary["methods"]
  best_base = max(scores[learner]["f1_macro"] for learner in learner_outputs.LEARNERS)
  assert best_base < 0.7, scores
  for method in ("stacked", "mmshap_dataset", "mmshap_sample"):
    assert scores[method]["f1_macro"] > best_base + 0.25, (method, scores)


def _designed_members(labels, right):
  """(members, N, 4) probabilities: 0.6 on the true class where `right`, else 0.6 on a wrong one."""
  wrong = (labels + 1) % 4
  probabilities = np.full(right.shape + (4,), 0.1)
  rows = np.arange(len(labels))
  probabilities[:, rows, labels] = np.where(right, 0.6, 0.2)
  probabilities[:, rows, wrong] = np.where(right, 0.2, 0.6)
  return probabilities


def test_cross_fit_reports_the_member_mean_on_test_and_out_of_fold_members_on_validation(
    tmp_path, monkeypatch):
  """Members with designed outputs stand in for trained ones: on test each member is wrong on its
  own third of the examples, so only the mean of all three is right everywhere; on validation only
  the member that held an example out is right on it."""
  workdir = fakes.fake_workdir(str(tmp_path))
  config = _cross_fit_config("eval")
  config.meta.weighting = "none"
  validation, test = (learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS)
  _, holdout = meta.member_masks(validation.labels, config.meta, config.seed)
  members = len(holdout)
  test_right = np.arange(len(test.labels))[None] % members != np.arange(members)[:, None]
  outputs = {len(validation.labels): _designed_members(validation.labels, holdout),
             len(test.labels): _designed_members(test.labels, test_right)}
  assert len(outputs) == 2  # The two splits are told apart by their sizes.
  monkeypatch.setattr(meta, "restore", lambda *args, **kwargs: (
      lambda features: outputs[len(features)], {"step": 40, "kept_step": [40] * members}))

  report = ensemble.evaluate_methods(workdir, config)
  assert report["methods"]["stacked"]["f1_macro"] == 1.0
  for member in outputs[len(test.labels)]:  # No single member would do.
    assert metrics.classification_metrics(test.labels, member.argmax(-1), 4)["f1_macro"] < 0.9
  with open(os.path.join(workdir, "meta", "training.json")) as f:
    held_out = json.load(f)["stacked"]["held_out_validation"]
  assert held_out["examples"] == len(validation.labels)
  assert held_out["accuracy"] == 1.0


# --------------------------------------------------------------------------------------------------
# Predict's default method ('auto'): the best validation macro F1, out of fold for the meta-models.


def _write_validation_logits(workdir, right):
  """Each learner's validation logits: sure of the true class where right[learner], else of the
  same wrong class (so their average is wrong there too)."""
  validation = learner_outputs.load_base_outputs(workdir, "validation")
  labels = validation.labels
  for learner, rows in right.items():
    predicted = np.where(rows, labels, (labels + 1) % 4)
    fakes.write_logits(workdir, learner, "validation", 10 * np.eye(4)[predicted], labels,
                       validation.ids)


def _designed_meta_models(monkeypatch, workdir, config, wrong_every):
  """meta.restore replaced by members with designed outputs (nothing trained): on validation each
  method's member is right on the examples it holds out but every `wrong_every[method]`-th (None:
  all of them) and wrong on the rest; on test every member is right. Returns the validation labels
  and each method's out-of-fold predictions."""
  validation, test = (learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS)
  labels = validation.labels
  _, holdout = meta.member_masks(labels, config.meta, config.seed)
  rows = np.arange(len(labels))
  right = {method: holdout & (rows % every != 0 if every else True)
           for method, every in wrong_every.items()}
  test_right = np.ones((len(holdout), len(test.labels)), bool)

  def restore(data, *args, **kwargs):
    outputs = {len(labels): _designed_members(labels, right[data.method]),
               len(test.labels): _designed_members(test.labels, test_right)}
    return (lambda features: outputs[len(features)],
            {"step": 40, "kept_step": [40] * len(holdout)})

  monkeypatch.setattr(meta, "restore", restore)
  out_of_fold = {method: np.where(mask.any(axis=0), labels, (labels + 1) % 4)
                 for method, mask in right.items()}
  return labels, out_of_fold


def _selection(workdir):
  with open(os.path.join(workdir, "meta", "selection.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("winner", ["stacked", "mmbt"])
def test_auto_is_the_method_with_the_best_validation_score_out_of_fold_for_the_meta_models(
    tmp_path, monkeypatch, winner):
  """A meta-model (stacked) or a learner (mmbt) is alone at the top of validation macro F1;
  mmshap_sample, the old fixed choice, is the worst meta-model."""
  workdir = fakes.fake_workdir(str(tmp_path))
  config = _cross_fit_config("eval")
  rows = np.arange(24)
  _write_validation_logits(workdir, {"text": rows % 2 == 0, "image": rows % 2 == 0,
                                     "mmbt": rows < 24 if winner == "mmbt" else rows % 2 == 0})
  labels, out_of_fold = _designed_meta_models(
      monkeypatch, workdir, config,
      {"stacked": None if winner == "stacked" else 4, "mmshap_dataset": 3, "mmshap_sample": 2})
  ensemble.evaluate_methods(workdir, config)

  selection = _selection(workdir)
  validation = learner_outputs.load_base_outputs(workdir, "validation")
  predicted = {name: p.argmax(-1)
               for name, p in ensemble.learner_probabilities(validation.logits).items()}
  expected = {method: metrics.classification_metrics(labels, predicted, 4)["f1_macro"]
              for method, predicted in {**predicted, **out_of_fold}.items()}
  assert selection["scores"] == pytest.approx(expected)
  assert selection["scored_on"] == {**{m: "validation" for m in predicted},
                                    **{m: "out-of-fold" for m in out_of_fold}}
  scores = selection["scores"]
  assert sorted(scores.values())[-2] < scores[winner] == max(scores.values())  # Alone at the top.
  assert scores["mmshap_sample"] < scores["mmshap_dataset"]
  assert selection["chosen"] == selection["ranking"][0] == winner
  assert [scores[m] for m in selection["ranking"]] == sorted(scores.values(), reverse=True)
  assert selection["rule"] == ensemble.BEST_RULE
  with open(os.path.join(workdir, "meta", "report.md")) as f:
    assert f"predict's default method ('auto'): **{winner}**" in f.read()


def test_without_out_of_fold_scores_auto_follows_the_fixed_preference(tmp_path, monkeypatch):
  """Early stopping alone scores a meta-model on its holdout, a fifth of validation: not compared
  with the learners' scores on all of it, even where it is the best (stacked, right on all)."""
  workdir = fakes.fake_workdir(str(tmp_path))
  config = fakes.meta_config(early_stopping=True)
  config.mode = "eval"
  _designed_meta_models(monkeypatch, workdir, config,
                        {"stacked": None, "mmshap_dataset": 3, "mmshap_sample": 2})
  ensemble.evaluate_methods(workdir, config)
  with open(os.path.join(workdir, "meta", "training.json")) as f:
    held_out = json.load(f)["stacked"]["held_out_validation"]
  assert held_out["f1_macro"] == 1.0 and held_out["examples"] < 24
  selection = _selection(workdir)
  assert selection["chosen"] == "mmshap_sample"
  assert selection["ranking"] == [m for m in ensemble.PREFERENCE if m != "mmshap_complement"]
  assert selection["rule"].startswith("fixed preference mmshap_sample, mmshap_dataset, stacked")
  assert "meta.cross_fit=0: no out-of-fold scores" in selection["rule"]
  assert set(selection["scores"]) == {"text", "image", "mmbt", "average"}  # On validation.


def test_ties_go_to_the_first_in_the_preference_and_a_missing_choice_to_the_next_in_the_ranking():
  methods = ensemble.method_names(["none", "dataset", "sample"])
  scores = {**dict.fromkeys(methods, 0.5), "text": 0.9, "stacked": 0.9, "mmshap_dataset": 0.9}
  selection = ensemble.select_method(methods, scores, {}, "")
  assert selection["ranking"] == ["mmshap_dataset", "stacked", "text", "mmshap_sample", "average",
                                  "mmbt", "image"]
  assert ensemble.auto_method(selection, methods) == ("mmshap_dataset", None)
  selection = ensemble.select_method(methods, {**scores, "mmshap_sample": 1.0}, {}, "")
  assert ensemble.auto_method(selection, methods) == ("mmshap_sample", None)
  unexplained = [m for m in methods if m != "mmshap_sample"]
  method, why = ensemble.auto_method(selection, unexplained)
  assert method == "mmshap_dataset" and "needs the products' MM-SHAP" in why
