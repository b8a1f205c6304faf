"""validate(config): every shipped config passes; each impossible combination fails at once, named."""

import pytest

from configs import clip_pretrain, common, image, meta, mmbt, mmshap, text
from jmmshap import stages, validation

STAGE_CONFIGS = (text, image, clip_pretrain, mmbt, mmshap, meta)


@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_shipped_config_is_valid_on_one_two_and_eight_devices(variant):
  for module in STAGE_CONFIGS:
    for devices in (1, 2, 8):
      validation.validate(module.get_config(variant), num_devices=devices)
  validation.validate(meta.get_config("taimd17k,paper"), num_devices=8)


def _problems(config, devices=2) -> str:
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config, num_devices=devices)
  return str(error.value)


def test_image_embeddings_outside_the_pooling_table_are_refused():
  config = mmbt.get_config()
  config.model.num_image_embeddings = 5
  assert "model.num_image_embeddings=5 is not in the pooling table; use one of [1, 2, 3, 4" in (
      _problems(config))


def test_exact_players_above_the_cap_are_refused():
  config = mmshap.get_config()
  config.max_exact_players = 30
  assert "max_exact_players=30" in _problems(config)
  pipeline = meta.get_config()
  pipeline.stages.mmshap.update(method="exact", max_text_players=22)
  assert ("stages.mmshap.method='exact': max_text_players=22 + 4 image players exceed the exact cap "
          "of 24") in _problems(pipeline)


def test_sample_weighting_without_every_examples_shares_is_refused():
  config = meta.get_config()
  config.stages.mmshap.max_examples = 100
  assert "meta.weighting includes 'sample'" in _problems(config)
  config.meta.weighting = "none,dataset"
  validation.validate(config, num_devices=2)


def test_batch_size_that_does_not_split_over_the_devices_is_refused():
  config = text.get_config()
  config.batch_size = 60
  validation.validate(config, num_devices=4)
  assert "batch_size=60 does not split over the 8 devices: use a multiple of 8" in _problems(config, 8)


def test_every_problem_is_listed_in_one_error():
  config = meta.get_config()
  config.stages.mmbt.model.num_image_embeddings = 7
  config.stages.image.optimizer.name = "adagrad"
  config.stages.text.dtype = "float16"
  config.meta.weighting = "none,median"
  message = _problems(config)
  assert "4 setting(s) cannot work" in message
  for fragment in ("num_image_embeddings=7", "optimizer.name='adagrad'", "dtype='float16'",
                   "meta.weighting='none,median'"):
    assert fragment in message


def test_clip_patch_that_does_not_divide_the_image_is_refused():
  config = clip_pretrain.get_config()
  config.model.clip.patch_size = 5
  assert "patch_size=5 does not divide data.image_size=32" in _problems(config)


def test_stages_run_validates_before_any_work(tmp_path):
  config = mmbt.get_config()
  config.model.num_image_embeddings = 5
  with pytest.raises(validation.ConfigError, match="pooling table"):
    stages.run(config, str(tmp_path / "never_written"))
  assert not (tmp_path / "never_written").exists()
