"""The classifier stages: the image and mmbt learners train end to end and restore for later stages;
best/ is chosen on validation macro F1."""

import json
import os

import numpy as np
import pytest

from jmmshap import classifier, metrics, pipeline, train_lib, workdir


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
