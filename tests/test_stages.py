"""Every stage config loads in every variant, and the image and mmbt stages train end to end."""

import json
import os

import pytest

from configs import clip_pretrain, common, image, mmbt, text
from jmmshap import metrics, stages, train_lib

CONFIG_MODULES = {"text": text, "image": image, "mmbt": mmbt, "clip_pretrain": clip_pretrain}


@pytest.mark.parametrize("variant", common.VARIANTS)
@pytest.mark.parametrize("stage", sorted(CONFIG_MODULES))
def test_every_stage_config_loads_in_every_variant(stage, variant):
  config = CONFIG_MODULES[stage].get_config(variant)
  assert config.stage == stage and config.variant == variant
  assert config.batch_size % 2 == 0  # Splits over the test's two devices and a GPU host's.


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant 'imagenet'"):
    text.get_config("imagenet")
  with pytest.raises(ValueError, match="unknown options"):
    mmbt.get_config("toyshop,huge")


def test_mmbt_paper_setting_has_the_papers_sizes():
  config = mmbt.get_config("taimd17k,paper")
  assert (config.model.num_image_embeddings, config.data.max_length, config.data.image_size) == (
      4, 120, 288)
  assert config.model.bert.hidden_size == 768 and config.model.clip.patch_size == 32


def _tiny(config, data_dir):
  config.data.data_dir = data_dir
  config.data.toyshop.update(train_per_class=4, validation_per_class=2, test_per_class=2)
  config.batch_size = config.eval_batch_size = 16
  config.total_steps = 2
  config.log_every_steps = 1
  return config


def test_workdir_paths_resolve_inside_the_run_and_other_paths_stay():
  config = mmbt.get_config("fashion")
  resolved = stages.resolve_workdir_paths(config, "/runs/a")
  assert resolved.init_from_image == "/runs/a/clip_pretrain/export"
  assert resolved.init_from_text == config.init_from_text == common.MINILM
  assert config.init_from_image == "workdir:clip_pretrain/export"


@pytest.mark.parametrize("stage", ["image", "mmbt"])
def test_stage_trains_and_writes_its_outputs(stage, tmp_path_factory):
  root = tmp_path_factory.getbasetemp()
  config = _tiny(CONFIG_MODULES[stage].get_config(), str(root / "tfds_stages"))
  if stage == "image":
    config.model.width = 4
  else:
    config.data.max_length = 10
    config.model.bert.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32)
    config.model.clip.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, patch_size=16)
  workdir = str(root / f"workdir_{stage}")
  report = stages.run(config, workdir)
  assert set(report["test"]) == set(metrics.METRIC_NAMES)
  for name in ("metrics.json", "logits_validation.npz", "logits_test.npz", "loss.png"):
    assert os.path.isfile(os.path.join(workdir, stage, name))
  restored = train_lib.load_trained(workdir, stages.CLASSIFIERS[stage])
  with open(os.path.join(workdir, stage, train_lib.CLASS_NAMES_FILE)) as f:
    assert restored.class_names == json.load(f) and len(restored.class_names) == 12


def test_loading_a_stage_that_was_never_trained_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="train the mmbt stage"):
    train_lib.load_trained(str(tmp_path), stages.MMBT)
