"""Every stage's config loads in every variant; the `variant,option` argument is parsed alike."""

import pytest

from configs import clip_pretrain, common, image, meta, mmbt, mmshap, text
from jmmshap import pipeline

CONFIG_MODULES = {"text": text, "image": image, "mmbt": mmbt, "clip_pretrain": clip_pretrain,
                  "mmshap": mmshap}


def test_every_stage_of_the_pipeline_has_a_config_file():
  assert set(CONFIG_MODULES) | {"meta"} == set(pipeline.REGISTRY)


@pytest.mark.parametrize("variant", common.VARIANTS)
@pytest.mark.parametrize("stage", sorted(CONFIG_MODULES))
def test_every_stage_config_loads_in_every_variant(stage, variant):
  config = CONFIG_MODULES[stage].get_config(variant)
  assert config.stage == stage and config.variant == variant
  if stage != "mmshap":
    assert config.batch_size % 2 == 0  # Splits over the test's two devices and a GPU host's.


def test_unknown_variant_and_option_are_refused():
  with pytest.raises(ValueError, match="unknown variant 'imagenet'"):
    text.get_config("imagenet")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['huge'\]"):
    mmbt.get_config("toyshop,huge")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['huge'\] .*use paper"):
    text.get_config("toyshop,huge")


def test_mmbt_paper_setting_has_the_papers_sizes():
  config = mmbt.get_config("taimd17k,paper")
  assert (config.model.num_image_embeddings, config.data.max_length, config.data.image_size) == (
      4, 120, 288)
  assert config.model.bert.hidden_size == 768 and config.model.clip.patch_size == 32


@pytest.mark.parametrize("variant",
                         ["toyshop", "fashion", "fashion_sub", "taimd17k", "taimd17k,paper"])
def test_meta_config_loads_in_every_variant_with_one_shared_data_config(variant):
  """The data location is given once; image sizes and checkpoints are per stage (the latter set
  through the three top-level checkpoint fields)."""
  config = meta.get_config(variant)
  pretrains = variant.startswith("fashion")  # Their MMBT starts from the clip_pretrain stage's tower.
  assert config.stage == "meta" and set(config.stages.keys()) == (
      set(pipeline.UPSTREAM) - (set() if pretrains else {"clip_pretrain"}))
  config.data.data_dir = "/elsewhere"
  for name in config.stages:
    assert config.stages[name].data.data_dir == "/elsewhere"
  assert "image_size" not in config.data
  if variant.endswith("paper"):
    assert (config.meta.optimizer.name, config.meta.optimizer.learning_rate,
            config.meta.num_steps, config.meta.hidden_size) == ("sgd", 1e-4, 50_000, 512)
  # Out-of-fold scores for predict's 'auto' by default; the paper's single meta-MLP has none.
  assert config.meta.cross_fit == (0 if variant.endswith("paper") else 5)
  with pytest.raises(ValueError, match="unknown option"):
    meta.get_config("toyshop,huge")


def test_the_paper_preset_sets_every_stage_from_three_checkpoints():
  config = meta.get_config("taimd17k,paper")
  stages = config.stages
  assert (stages.text.init_from, stages.mmbt.init_from_text) == (common.PAPER_TEXT_CHECKPOINT,) * 2
  assert stages.image.init_from == common.PAPER_IMAGE_CHECKPOINT
  assert stages.mmbt.init_from_image == common.PAPER_CLIP_CHECKPOINT
  assert (stages.text.data.max_length, stages.mmbt.data.max_length) == (120, 120)
  assert (stages.image.data.image_size, stages.mmbt.data.image_size) == (224, 288)
  assert stages.mmbt.model.num_image_embeddings == 4 and stages.image.model.depth == 152
  assert (config.meta.optimizer.name, config.meta.num_steps) == ("sgd", 50_000)
  # One flag per checkpoint reaches every stage that starts from it, and only those.
  config.text_checkpoint = "/models/bert-base"
  config.clip_checkpoint = "/models/clip"
  assert stages.text.init_from == stages.mmbt.init_from_text == "/models/bert-base"
  assert stages.mmbt.init_from_image == "/models/clip"
  assert stages.image.init_from == common.PAPER_IMAGE_CHECKPOINT
  assert meta.get_config("toyshop,meta_paper").stages.text.init_from is None
  assert meta.get_config("toyshop,meta_paper").meta.cross_fit == 0
