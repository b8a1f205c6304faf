"""The pipeline: every config checked before any work, the stage registry, and the main job that
runs the missing stages, reuses the finished ones and reruns the stale ones."""

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess

from PIL import Image
import pytest

from configs import clip_pretrain, common, image, meta, mmbt, mmshap, text
from jmmshap import builders, config_checks, pipeline, workdir

STAGE_CONFIGS = (text, image, clip_pretrain, mmbt, mmshap, meta)


@pytest.mark.parametrize("variant", common.VARIANTS)
def test_every_shipped_config_is_valid_on_one_two_and_eight_devices(variant):
  for module in STAGE_CONFIGS:
    for devices in (1, 2, 8):
      pipeline.validate(module.get_config(variant), num_devices=devices)
  pipeline.validate(meta.get_config("taimd17k,paper"), num_devices=8)


def _problems(config, devices=2) -> str:
  with pytest.raises(config_checks.ConfigError) as error:
    pipeline.validate(config, num_devices=devices)
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
  pipeline.validate(config, num_devices=2)


def test_sample_weighting_from_explained_labels_is_refused_as_a_test_label_leak():
  config = meta.get_config()
  config.stages.mmshap.target = "label"
  assert "would read the test labels" in _problems(config)
  config.meta.weighting = "none,dataset"
  pipeline.validate(config, num_devices=2)


def test_exact_patch_players_need_a_fixed_grid_within_the_cap():
  config = mmshap.get_config()
  config.update(method="exact", max_text_players=4, image_players="patches")
  assert "image_players='patches' and patch_grid=0" in _problems(config)
  config.patch_grid = 5
  assert "max_text_players=4 + 25 patches exceed the exact cap of 24" in _problems(config)
  config.patch_grid = 4
  pipeline.validate(config, num_devices=2)
  config.image_players = "pixels"
  assert "image_players='pixels'" in _problems(config)


def test_batch_size_that_does_not_split_over_the_devices_is_refused():
  config = text.get_config()
  config.batch_size = 60
  pipeline.validate(config, num_devices=4)
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


def test_negative_steps_and_seed_and_no_kept_checkpoint_are_refused_at_once():
  config = text.get_config()
  config.update(total_steps=-5, seed=-1, keep_checkpoints=0)
  message = _problems(config)
  assert "3 setting(s) cannot work" in message
  for fragment in ("total_steps=-5: must be an integer >= 0", "seed=-1: must be an integer >= 0",
                   "keep_checkpoints=0: must be an integer >= 1"):
    assert fragment in message
  pipeline_config = meta.get_config()
  pipeline_config.meta.keep_checkpoints = 0
  assert "meta.keep_checkpoints=0: must be a positive integer" in _problems(pipeline_config)


def test_impossible_image_learner_options_are_refused_naming_each_field():
  config = image.get_config()
  config.update(label_smoothing=1.0, ema_decay=-0.1, random_crop=True, crop_area=(0.8, 0.2),
                crop_aspect_ratio=(0.0, 2.0))
  config.model.kind = "vit"
  message = _problems(config)
  assert "5 setting(s) cannot work" in message
  for fragment in ("label_smoothing=1.0: must be a number in [0, 1)",
                   "ema_decay=-0.1: must be a number in [0, 1)",
                   "crop_area=(0.8, 0.2): must be (min, max) with 0 < min <= max <= 1",
                   "crop_aspect_ratio=(0.0, 2.0): must be (min, max) with 0 < min <= max.",
                   "model.kind='vit': use one of resnet, clip"):
    assert fragment in message
  config = image.get_config()
  config.model.kind = "clip"
  pipeline.validate(config, num_devices=2)
  config.model.clip.patch_size = 5
  assert "model.clip.patch_size=5 does not divide data.image_size=32" in _problems(config)
  pipeline_config = meta.get_config()
  pipeline_config.stages.image.ema_decay = 1.0
  assert "stages.image.ema_decay=1.0" in _problems(pipeline_config)


def test_an_image_learner_on_the_clip_pretrain_tower_is_a_valid_fashion_main_job():
  config = meta.get_config("fashion")
  config.image_checkpoint = "workdir:clip_pretrain/export"
  config.stages.image.model.kind = "clip"
  pipeline.validate(config, num_devices=2)
  assert workdir.stages_referenced(config.stages.image) == {"clip_pretrain"}
  names = list(config.stages)
  assert names.index("clip_pretrain") < names.index("image")


def test_clip_patch_that_does_not_divide_the_image_is_refused():
  config = clip_pretrain.get_config()
  config.model.clip.patch_size = 5
  assert "patch_size=5 does not divide data.image_size=32" in _problems(config)


def test_stages_run_validates_before_any_work(tmp_path):
  config = mmbt.get_config()
  config.model.num_image_embeddings = 5
  with pytest.raises(config_checks.ConfigError, match="pooling table"):
    pipeline.run(config, str(tmp_path / "never_written"))
  assert not (tmp_path / "never_written").exists()


def test_unknown_stage_mode_and_rerun_names_are_refused(tmp_path):
  config = text.get_config()
  config.stage = "txet"
  with pytest.raises(ValueError, match="known stages"):
    pipeline.run(config, str(tmp_path))
  config = text.get_config()
  config.mode = "evaluate"
  with pytest.raises(ValueError, match="use 'train' or 'eval'"):
    pipeline.run(config, str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown stage\(s\) bert"):
    pipeline.parse_rerun("text,bert")


def test_the_registry_lists_each_stage_once_after_what_it_reads():
  names = [stage.name for stage in pipeline.STAGES]
  assert len(set(names)) == len(names) and names[-1] == pipeline.MAIN_JOB
  for position, stage in enumerate(pipeline.STAGES):
    assert set(stage.reads) <= set(names[:position]), stage.name
    assert stage.writes, stage.name


def test_the_main_job_runs_every_missing_stage_then_reuses_them(tmp_path_factory, tiny,
                                                                tiny_learners, caplog):
  root = tmp_path_factory.getbasetemp()
  config = tiny.pipeline(str(root / "tfds_stages"))
  assert config.stages.mmbt.data.toyshop.validation_per_class == 2  # Shared, not copied.
  assert config.stages.image.data.data_dir == str(root / "tfds_stages")
  job = str(root / "workdir_meta")
  tiny_learners(job)  # The session's learners (where their data was prepared does not matter).
  shutil.rmtree(os.path.join(job, "mmbt"))  # A missing learner, and the stages after it.
  with caplog.at_level(logging.INFO):
    report = pipeline.run(config, job)
  ran = [message.split()[3] for message in caplog.messages if message.startswith("pipeline: running")]
  assert ran == ["mmbt", "mmshap"]
  assert list(report["methods"]) == ["text", "image", "mmbt", "average", "stacked",
                                     "mmshap_dataset", "mmshap_sample"]
  assert "clip_pretrain" not in config.stages  # Only the fashion variants pretrain a tower.
  for stage in config.stages:
    assert workdir.missing(job, stage, pipeline.REGISTRY[stage].writes) == []
  with open(os.path.join(job, "mmbt", "metrics.json")) as f:
    mmbt_test = json.load(f)["test"]
  assert report["methods"]["mmbt"] == pytest.approx(mmbt_test)
  for name in ("metrics.json", "report.md", "confusion_matrix.png", "per_class_f1.png", "config.json"):
    assert os.path.getsize(os.path.join(job, "meta", name)) > 0

  assert pipeline.run_upstream(config, job) == []  # Everything finished is reused.
  # Where the data lives and how often a stage logs do not change what it learns: still reused.
  moved = tiny.pipeline(str(root / "tfds_moved"), {"stages.text.log_every_steps": 2})
  assert pipeline.run_upstream(moved, job) == []
  # An MMBT built again since MM-SHAP explained it: MM-SHAP is out of date and runs again.
  fingerprint = workdir.read_fingerprint(job, "mmbt")
  workdir.write_json(workdir.path(job, "mmbt", workdir.FINGERPRINT), {**fingerprint, "run": "new"})
  assert pipeline.run_upstream(config, job) == ["mmshap"]
  assert pipeline.run_upstream(config, job) == []
  config.stages.text.total_steps = 3
  with pytest.raises(ValueError, match=r"workdir_meta/text was trained with other settings .*"
                                       r"total_steps: 2 there, 3 now.*add text to --config.rerun"):
    pipeline.run_upstream(config, job)
  # Other data under the same settings (another toyshop draw): never reused for it.
  other_data = tiny.pipeline(str(root / "tfds_stages"), {"data.toyshop.seed": 1})
  with pytest.raises(workdir.StaleStageError, match=r"workdir_meta/text was trained with other "
                                                    r"settings or data .*dataset: toyshop/"):
    pipeline.run_upstream(other_data, job)


def test_a_second_job_on_a_stage_refuses_to_start_and_a_dead_owners_lock_is_taken_over(
    tmp_path, tiny):
  job = str(tmp_path / "job")
  config = tiny.config("image", str(tmp_path / "tfds"))
  lock = os.path.join(workdir.stage_dir(job, "image"), workdir.LOCK)
  os.makedirs(os.path.dirname(lock))
  with subprocess.Popen(["sleep", "60"]) as other:
    try:
      workdir.write_json(lock, {"pid": other.pid, "host": socket.gethostname(), "since": 0})
      with pytest.raises(RuntimeError, match=rf"another job \(process {other.pid} on .*\) is writing "
                                             r"into .*job/image"):
        pipeline.run(config, job)
      assert not os.path.exists(workdir.path(job, "image", workdir.METRICS))
    finally:
      other.kill()
  pipeline.run(config, job)  # Its owner is gone: the lock is taken over, and released after.
  assert os.path.isfile(workdir.path(job, "image", workdir.METRICS))
  assert not os.path.exists(lock)


def test_the_main_job_skips_an_optional_stage_that_no_stage_reads_after_overrides(tmp_path,
                                                                                 monkeypatch):
  """The fashion main job pretrains a tower for the MMBT; an MMBT pointed at the image learner's
  export instead makes clip_pretrain unread, so it is not run (nothing is trained here: the stage
  runner is replaced by a recorder)."""
  ran = []
  monkeypatch.setattr(pipeline, "run", lambda config, root: ran.append(config.stage))
  monkeypatch.setattr(pipeline, "_reuse", lambda root, stage, config: False)
  config = meta.get_config("fashion")
  assert "clip_pretrain" in config.stages
  pipeline.run_upstream(config, str(tmp_path))
  assert ran == ["text", "clip_pretrain", "image", "mmbt", "mmshap"]
  ran.clear()
  config.stages.mmbt.model.image_tower = "resnet"
  config.stages.mmbt.init_from_image = "workdir:image/export"
  assert pipeline.run_upstream(config, str(tmp_path)) == ["text", "image", "mmbt", "mmshap"]
  assert ran == ["text", "image", "mmbt", "mmshap"]


def test_the_main_job_reads_its_catalogue_once_for_all_its_stages(tmp_path, monkeypatch,
                                                                  opened_files):
  """Every stage builds its dataset config (a product folder here); the job reads the CSV and
  fingerprints the photos once (the stages are replaced by recorders that only do that)."""
  folder = tmp_path / "shop"
  os.makedirs(folder / "images")
  with open(folder / "products.csv", "w") as f:
    f.write("id,text,label,split\n")
    for i, split in enumerate(["train", "train", "validation", "test"]):
      f.write(f"p{i},a product,{'ab'[i % 2]},{split}\n")
      Image.new("RGB", (4, 4)).save(folder / "images" / f"p{i}.jpg")
  built = []
  for name, stage in pipeline.REGISTRY.items():
    record = lambda config, root, name=name: built.append(
        (name, config.get("data", {}).get("name") and builders.builder_for(config.data).info.full_name))
    monkeypatch.setitem(pipeline.REGISTRY, name, dataclasses.replace(stage, run=record))
  monkeypatch.setattr(pipeline, "_reuse", lambda root, stage, config: False)
  config = meta.get_config("taimd17k")
  for stage_config in (config, *config.stages.values()):
    stage_config.data.manual_dir = str(folder)  # (The mmshap stage reads the MMBT's data.)
    stage_config.data.data_dir = str(tmp_path / "tfds")
  opened_files.clear()
  pipeline.run(config, str(tmp_path / "job"))
  assert [name for name, _ in built] == ["text", "image", "mmbt", "mmshap", "meta"]
  assert len({full_name for _, full_name in built if full_name}) == 1
  photos = [path for path in opened_files if path.startswith(str(folder / "images"))]
  assert opened_files.count(str(folder / "products.csv")) == 2  # Parsed, and its sha256.
  assert sorted(photos) == sorted(str(folder / "images" / f"p{i}.jpg") for i in range(4))
