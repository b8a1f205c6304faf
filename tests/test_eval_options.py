"""scripts/eval_options.py: a finished stage's last train state, evaluated with the trained params and
with their moving average, each with and without flip averaging."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jmmshap import builders, classifier, input_pipeline, train_lib, workdir
from scripts import eval_options


def _validation_loss(model, config, flip: bool) -> float:
  """Cross-entropy on validation by direct model calls (the oracle: no jit, no batching)."""
  preprocess = classifier.make_preprocessor(config, classifier.IMAGE, None)
  source = builders.data_source(builders.builder_for(config.data), "validation")
  batch = preprocess.normalised(preprocess(input_pipeline.read_records(source, range(len(source)))))
  pixels = jax.numpy.asarray(batch["pixel_values"])
  logits = np.asarray(model(pixels)["logits"])
  if flip:
    logits = (logits + np.asarray(model(pixels[:, :, ::-1])["logits"])) / 2
  return float(train_lib.cross_entropy(logits, batch["label"]).mean())


def test_each_row_is_the_params_and_flip_setting_it_names(with_options):
  """The EMA with flips is what the run itself validated at its last step (log.jsonl); the trained
  params without flips match direct calls of a model holding the checkpoint's raw params; the four
  rows differ."""
  _, job, _ = with_options
  results = eval_options.evaluate_options(job, "image")
  assert set(results) == {"trained", "ema"}
  assert all(set(by_flip) == {"flip", "no_flip"} for by_flip in results.values())
  with open(os.path.join(job, "image", workdir.LOG)) as f:
    last = [r for r in map(json.loads, f) if r["split"] == "validation" and r["step"] == 4][-1]
  assert results["ema"]["flip"]["validation"]["loss"] == pytest.approx(last["loss"], rel=1e-5)
  assert results["ema"]["flip"]["validation"]["f1_macro"] == pytest.approx(last["f1_macro"])

  config = workdir.read_config(job, "image")
  state = ocp.StandardCheckpointer().restore(os.path.join(job, "image", "checkpoints", "4", "state"))
  model = classifier.build_image_model(config, 12, None)
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, state["params"])
  nnx.replace_by_pure_dict(model_state, state["model_state"])
  raw = nnx.merge(graphdef, params, model_state)
  for flip, name in ((False, "no_flip"), (True, "flip")):
    assert results["trained"][name]["validation"]["loss"] == pytest.approx(
        _validation_loss(raw, config, flip), rel=1e-4)
  losses = {(v, f): results[v][f]["validation"]["loss"] for v in results for f in results[v]}
  assert len({round(loss, 6) for loss in losses.values()}) == 4


def test_a_run_that_is_not_finished_is_refused(with_options, tmp_path):
  """Only the last train state is the run whose options are measured: a copy whose newest
  checkpoint is step 2 of 4 is refused, naming the step."""
  _, job, _ = with_options
  stage = tmp_path / "image"
  shutil.copytree(os.path.join(job, "image"), stage)
  shutil.rmtree(stage / "checkpoints" / "4")
  with pytest.raises(ValueError, match=r"latest train state is step 2 of 4; finish the run first"):
    eval_options.evaluate_options(str(tmp_path), "image")
