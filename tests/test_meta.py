"""The meta-learner: which validation examples each member trains on and holds out; early stopping
keeps, and restore returns, the params of the lowest held-out loss."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import event_files
import fakes
from jmmshap import meta, weighting

def test_cross_fit_holds_every_validation_example_out_exactly_once_with_balanced_classes():
  labels = np.repeat(np.arange(4), 5)
  config = fakes.meta_config(cross_fit=3).meta
  train, holdout = meta.member_masks(labels, config, seed=0)
  assert train.shape == holdout.shape == (3, 20)
  np.testing.assert_array_equal(holdout.sum(axis=0), 1)
  np.testing.assert_array_equal(train, ~holdout)
  assert sorted(holdout.sum(axis=1)) == [6, 7, 7]
  for member in holdout:  # Every class appears in every fold's training part.
    assert set(labels[~member]) == set(range(4))



def test_early_stopping_holds_out_a_stratified_fraction_of_validation():
  labels = np.repeat(np.arange(4), 10)
  train, holdout = meta.member_masks(labels, fakes.meta_config(early_stopping=True, holdout_fraction=0.2).meta,
                                     seed=0)
  assert train.shape == holdout.shape == (1, 40)
  np.testing.assert_array_equal(np.bincount(labels[holdout[0]]), [2, 2, 2, 2])
  np.testing.assert_array_equal(train, ~holdout)
  plain_train, plain_holdout = meta.member_masks(labels, fakes.meta_config().meta, seed=0)
  assert plain_train.all() and not plain_holdout.any()  # The paper: all of validation.


# --------------------------------------------------------------------------------------------------
# Early stopping on data where the held-out loss falls, then rises (a noisy 4-class problem that a
# 16-wide MLP at lr 1e-2 overfits within a few dozen steps).

EVERY, PATIENCE = 10, 2


def _overfitting_data() -> weighting.MethodData:
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 12)
  features = (0.8 * rng.normal(size=(4, 12))[labels] + rng.normal(size=(48, 12))).astype(np.float32)
  return weighting.MethodData("stacked", "none", {"validation": features, "test": features[::3]},
                              {"validation": labels, "test": labels[::3]}, {})


def _early_stopping_config():
  config = fakes.meta_config(early_stopping=True, patience=PATIENCE, num_steps=100,
                             eval_every_steps=EVERY, checkpoint_every_steps=EVERY, keep_checkpoints=20)
  config.meta.optimizer.update(learning_rate=1e-2, schedule="constant")
  return config


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("early_stopping") / "stacked")
  data, config = _overfitting_data(), _early_stopping_config()
  progress = meta.train(data, config.meta, directory, config.seed, fakes.CLASS_NAMES)
  with open(os.path.join(directory, "log.jsonl")) as f:
    held_out = {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "validation"}
  return directory, data, config, progress, held_out


def _mlp_probabilities(directory: str, step: int, features: np.ndarray) -> np.ndarray:
  """The meta-MLP of the checkpoint at `step` on `features`, in numpy: softmax(W2 relu(W1 x + b1) + b2)."""
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, "checkpoints", str(step), "state"))
  params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64)[0], state["params"])  # Member 0.
  hidden = np.maximum(features @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0)
  logits = hidden @ params["output"]["kernel"] + params["output"]["bias"]
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def test_early_stopping_keeps_the_step_of_the_lowest_held_out_loss_and_stops_after_patience(
    early_stopped):
  """The kept step is the argmin of the logged held-out losses, not the last one; training ends
  `patience` evaluations after it."""
  _, _, _, progress, held_out = early_stopped
  steps = sorted(held_out)
  best = min(steps, key=held_out.get)
  assert steps[0] < best < steps[-1], held_out  # The data do overfit: the argmin is inside.
  assert progress["kept_step"] == [best]
  assert progress["kept_loss"] == [pytest.approx(held_out[best], rel=1e-6)]
  assert progress["step"] == steps[-1] == best + PATIENCE * EVERY and progress["finished"]


def test_restore_predicts_with_exactly_the_kept_params_not_the_last_ones(early_stopped):
  """What eval mode reports comes from the params of the lowest held-out loss."""
  directory, data, config, progress, _ = early_stopped
  predict, restored_progress = meta.restore(data, config.meta, directory, config.seed,
                                            fakes.CLASS_NAMES)
  assert restored_progress == progress
  features = data.features["test"]
  members = predict(features)
  assert members.shape == (1, len(features), 4)
  kept = _mlp_probabilities(directory, progress["kept_step"][0], features)
  last = _mlp_probabilities(directory, progress["step"], features)
  assert np.abs(kept - last).max() > 1e-2  # The two are distinguishable.
  np.testing.assert_allclose(members[0], kept, rtol=1e-4, atol=1e-6)


def test_the_event_file_holds_the_train_and_held_out_curves_of_the_log(early_stopped):
  """`tensorboard --logdir W` shows each meta-MLP's curves: log.jsonl's train loss, accuracy and
  learning rate, and the held-out loss and accuracy of every evaluation, at their steps."""
  directory, _, _, _, held_out = early_stopped
  with open(os.path.join(directory, "log.jsonl")) as f:
    records = [json.loads(line) for line in f]
  written = event_files.scalars(event_files.only(directory))
  assert written == event_files.logged(records)
  assert {"train/loss", "train/accuracy", "train/learning_rate", "validation/loss",
          "validation/accuracy"} == {tag for tag, _ in written}
  assert {step for tag, step in written if tag == "validation/loss"} == set(held_out)
