"""The classifier stages: the image and mmbt learners train end to end and restore for later stages."""

import json
import os

import pytest

from jmmshap import classifier, metrics, pipeline, workdir


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
