"""The training loop: one train -> stop -> resume -> eval cycle of the text stage on toyshop, on 2 fake
CPU devices; the optimizer and its learning-rate schedules at their boundary steps."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import event_files
import fakes
from configs import text as text_config
from jmmshap import checkpoints, metrics, pipeline, train_lib
from jmmshap.workdir import StaleStageError


# 72 training titles (6 per class), 36 test; validation and checkpoints at steps 3 and 6.
TEXT = {"data.toyshop.train_per_class": 6, "data.toyshop.test_per_class": 3, "data.max_length": 12,
        "total_steps": 6, "eval_every_steps": 3, "checkpoint_every_steps": 3, "log_every_steps": 2}


def _latest_params(workdir: str, step: int) -> list[np.ndarray]:
  path = os.path.join(workdir, "text", "checkpoints", str(step), "state")
  restored = ocp.StandardCheckpointer().restore(path)
  return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
  root = tmp_path_factory.mktemp("train_lib")
  config = tiny.config("text", str(root / "tfds"), TEXT)
  workdir = str(root / "uninterrupted")
  report = pipeline.run(config, workdir)
  return config, root, workdir, report


def test_text_stage_writes_metrics_logits_curves_and_log(trained):
  _, _, workdir, report = trained
  stage = os.path.join(workdir, "text")
  with open(os.path.join(stage, "metrics.json")) as f:
    written = json.load(f)
  assert written == report
  assert set(written) == {"validation", "test"}
  assert set(written["test"]) == set(metrics.METRIC_NAMES)
  test = np.load(os.path.join(stage, "logits_test.npz"))
  num_classes = len(test["class_names"])
  assert test["logits"].shape == (num_classes * 3, num_classes)
  assert len(set(test["ids"])) == len(test["ids"])  # Every example once, none padded in.
  recomputed = metrics.classification_metrics(test["labels"], test["logits"].argmax(-1), num_classes)
  assert recomputed == pytest.approx(written["test"])
  with open(os.path.join(stage, "log.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]
  assert all(np.isfinite(r["loss"]) and r["examples_per_sec"] > 0 for r in records
             if r["split"] == "train")
  for name in ("loss.png", "accuracy.png", "tokenizer.json", "config.json"):
    assert os.path.getsize(os.path.join(stage, name)) > 0


def _log(stage: str) -> list[dict]:
  with open(os.path.join(stage, "log.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_the_stage_event_file_holds_the_logged_scalars_at_their_steps(trained):
  """`tensorboard --logdir W` shows log.jsonl: every number of every record, at its step, once."""
  _, _, workdir, _ = trained
  stage = os.path.join(workdir, "text")
  written = event_files.scalars(event_files.only(stage))
  assert written == event_files.logged(_log(stage))
  assert {"train/loss", "train/accuracy", "train/learning_rate", "train/examples_per_sec",
          "validation/loss", "validation/accuracy", "validation/f1_macro"} <= {t for t, _ in written}
  assert sorted(step for tag, step in written if tag == "validation/f1_macro") == [3, 6]


def test_resumed_run_ends_with_the_same_params_as_an_uninterrupted_one(trained):
  config, root, workdir, report = trained
  resumed = str(root / "resumed")
  shutil.copytree(workdir, resumed)
  stage = os.path.join(resumed, "text")
  # As if killed right after the step-3 checkpoint: later checkpoints and outputs never happened.
  fakes.as_if_killed_after_checkpoint(stage, 6)
  resumed_report = pipeline.run(config, resumed)
  for split in ("validation", "test"):
    assert resumed_report[split] == pytest.approx(report[split])
  for ours, theirs in zip(_latest_params(resumed, 6), _latest_params(workdir, 6)):
    np.testing.assert_array_equal(ours, theirs)
  with open(os.path.join(stage, "log.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == [2, 4, 6]  # Nothing logged twice.
  # One event file, holding what log.jsonl holds: the killed run's steps 4 and 6 replaced.
  assert event_files.scalars(event_files.only(stage)) == event_files.logged(_log(stage))


def test_eval_mode_restores_the_best_checkpoint_and_reproduces_metrics(trained):
  config, _, workdir, report = trained
  os.remove(os.path.join(workdir, "text", "metrics.json"))
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.mode = "eval"
  assert pipeline.run(eval_config, workdir) == report


def test_eval_mode_needs_only_the_stage_and_the_workdir(trained):
  """The command line `--config=configs/text.py --workdir=W --config.mode=eval`: the default
  config file, with the run's settings read from W (no training flag repeated)."""
  _, _, workdir, report = trained
  config = text_config.get_config()
  config.mode = "eval"
  assert pipeline.run(config, workdir, explicit={"mode": "eval"}) == report
  config.num_epochs = 3
  with pytest.raises(ValueError, match=r"evaluates the run saved in .*text with its own settings, "
                                       r"but --config.num_epochs=3 \(the run saved in .*config.json "
                                       r"has 8\): drop those flags"):
    pipeline.run(config, workdir, explicit={"mode": "eval", "num_epochs": 3})


def test_eval_mode_with_another_model_config_names_the_differing_setting(trained, tmp_path):
  config, _, workdir, _ = trained
  other = ml_collections.ConfigDict(config.to_dict())
  other.mode = "eval"
  other.model.intermediate_size = 48
  with pytest.raises(StaleStageError, match=r"text was built from other inputs than this run's "
                                            r"\(model.intermediate_size: 32 there, 48 now\)"):
    pipeline.run(other, workdir)
  # A folder of an older version, without its fingerprint: the checkpoint's shapes are checked.
  older = str(tmp_path / "older")
  shutil.copytree(workdir, older)
  os.remove(os.path.join(older, "text", "fingerprint.json"))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"(?s)text/best \(step \d\) was written by a model of another config:\n.*"
                           r"intermediate/kernel: \(16, 32\) in the checkpoint, \(16, 48\) in the model"):
    pipeline.run(other, older)


def test_a_trained_model_is_never_evaluated_on_other_data(trained):
  config, root, workdir, _ = trained
  other = ml_collections.ConfigDict(config.to_dict())
  other.mode = "eval"
  other.data.toyshop.seed = 1  # Same settings, another draw of products.
  with pytest.raises(StaleStageError, match=r"built from other inputs .*dataset: toyshop/.*seed0.* "
                                            r"there, toyshop/.*seed1.* now"):
    pipeline.run(other, workdir)


def test_optimizer_decays_matrices_but_not_biases():
  config = ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, weight_decay=0.5,
                                          schedule="constant"))
  optimizer, _ = train_lib.make_optimizer(config, total_steps=10)
  params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
  zero_grads = jax.tree.map(np.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5)
  np.testing.assert_allclose(new["bias"], 1.0)


def test_unknown_stage_and_mode_are_refused(tmp_path):
  config = text_config.get_config()
  config.stage = "txet"
  with pytest.raises(ValueError, match="known stages"):
    pipeline.run(config, str(tmp_path))
  config = text_config.get_config()
  config.mode = "evaluate"
  with pytest.raises(ValueError, match="use 'train' or 'eval'"):
    pipeline.run(config, str(tmp_path))


def _schedule(kind: str, warmup_fraction: float, total_steps: int = 100):
  config = ml_collections.ConfigDict(dict(learning_rate=2.0, warmup_fraction=warmup_fraction,
                                          schedule=kind))
  return lambda step: float(train_lib.learning_rate_schedule(config, total_steps)(step))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_learning_rate_warms_up_linearly_from_zero_to_the_peak_then_decays_to_zero_at_the_end(kind):
  """Warm-up of 20 of 100 steps: 0 at step 0, half the peak at 10, the peak at 20; the decay spans
  the remaining 80 steps and ends at 0 on the last step."""
  rate = _schedule(kind, 0.2)
  assert rate(0) == 0.0
  assert rate(10) == pytest.approx(1.0)
  assert rate(20) == pytest.approx(2.0)
  quarter = {"cosine": (1 + math.cos(math.pi / 4)) / 2, "linear": 0.75}[kind]  # 20 of 80 steps.
  assert rate(40) == pytest.approx(2.0 * quarter, rel=1e-5)
  assert rate(60) == pytest.approx(1.0, rel=1e-5)
  assert rate(100) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_learning_rate_without_warm_up_starts_at_the_peak_and_decays_over_every_step(kind):
  rate = _schedule(kind, 0.0)
  assert rate(0) == pytest.approx(2.0)
  assert rate(50) == pytest.approx(1.0, rel=1e-5)
  assert rate(100) == pytest.approx(0.0, abs=1e-6)


def test_constant_learning_rate_is_the_peak_after_its_warm_up():
  rate = _schedule("constant", 0.1)
  assert [rate(step) for step in (0, 5, 10, 50, 100)] == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])


def test_label_smoothing_zero_is_the_plain_loss_and_otherwise_the_smoothed_targets_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(7, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 7).astype(np.int32)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_array_equal(train_lib.cross_entropy(logits, labels), plain)
  np.testing.assert_array_equal(train_lib.cross_entropy(logits, labels, 0.0), plain)
  log_probs = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1,
                                                                                       keepdims=True))
  for smoothing in (0.1, 0.4):
    targets = (1 - smoothing) * np.eye(5)[labels] + smoothing / 5
    expected = -(targets * log_probs).sum(-1)
    np.testing.assert_allclose(train_lib.cross_entropy(logits, labels, smoothing), expected,
                               rtol=1e-5)


def test_ema_is_the_debiased_moving_average_of_every_iterate_and_copies_non_float_state():
  """Five SGD steps on a quadratic with a float and an integer model-state leaf: the EMA params
  equal sum_t d^(T-t) (1-d) p_t / (1-d^T) over the iterates, the float state likewise, the integer
  state is the latest; without a decay the state has no EMA at all."""
  decay = 0.8
  targets = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)

  def loss_fn(params, model_state, batch):
    new_state = {"mean": model_state["mean"] + batch["x"].mean(), "count": model_state["count"] + 1}
    return jnp.sum((params["w"] - batch["x"]) ** 2), ({}, new_state)

  optimizer = optax.sgd(0.3)
  params = {"w": jnp.zeros(3)}
  model_state = {"mean": jnp.float32(0.0), "count": jnp.int32(0)}
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params),
           "model_state": model_state,
           "ema": {"params": {"w": jnp.full(3, 9.0)}, "model_state": model_state}}
  step = jax.jit(train_lib.make_train_step(loss_fn, optimizer, ema_decay=decay))
  iterates, means = [], []
  for x in targets:
    state, _ = step(state, {"x": jnp.asarray(x)})
    iterates.append(np.asarray(state["params"]["w"], np.float64))
    means.append(float(state["model_state"]["mean"]))
  steps = len(targets)
  weights = np.asarray([decay ** (steps - t) * (1 - decay) for t in range(1, steps + 1)])
  weights /= 1 - decay ** steps
  assert weights.sum() == pytest.approx(1.0)
  np.testing.assert_allclose(state["ema"]["params"]["w"], weights @ np.stack(iterates), rtol=1e-5)
  assert float(state["ema"]["model_state"]["mean"]) == pytest.approx(weights @ means, rel=1e-5)
  assert int(state["ema"]["model_state"]["count"]) == steps
  assert not np.allclose(state["ema"]["params"]["w"], state["params"]["w"], atol=1e-3)
  assert train_lib.evaluated_model(state)["params"] is state["ema"]["params"]
  del state["ema"]
  plain_step = jax.jit(train_lib.make_train_step(loss_fn, optimizer))
  state, _ = plain_step(state, {"x": jnp.asarray(targets[0])})
  assert "ema" not in state and train_lib.evaluated_model(state)["params"] is state["params"]


def test_ema_weight_is_accurate_in_float32_for_a_decay_close_to_one():
  """1 - d^t in float32 loses the digits that matter for d = 0.9999; the weight must not."""
  decay = 0.9999
  for step in (1, 2, 10, 10_000):
    average = train_lib.ema_update({"w": jnp.float32(0.0)}, {"w": jnp.float32(1.0)},
                                   jnp.int32(step), decay)["w"]
    expected = (1 - decay) / (1 - decay ** step)  # float64
    assert float(average) == pytest.approx(expected, rel=1e-5)


def test_the_train_step_prepares_each_batch_with_its_own_step():
  """`prepare_batch(batch, step)` runs inside the step with the 0-based step the batch is for: the
  loss of a batch of zeros shifted by the step is 0, 1, 2."""

  def loss_fn(params, model_state, batch):
    return jnp.mean(batch["x"]) + 0.0 * params["w"].sum(), ({}, None)

  optimizer = optax.sgd(0.1)
  state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.zeros(2)}}
  state["opt_state"] = optimizer.init(state["params"])
  step = jax.jit(train_lib.make_train_step(
      loss_fn, optimizer, prepare_batch=lambda batch, step: {"x": batch["x"] + step}))
  losses = []
  for _ in range(3):
    state, step_metrics = step(state, {"x": jnp.zeros(4)})
    losses.append(float(step_metrics["loss"]))
  assert losses == [0.0, 1.0, 2.0]
