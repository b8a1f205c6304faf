"""The pipeline: every config checked before any work, the stage registry, and the main job that
runs the missing stages, reuses the finished ones and reruns the stale ones."""

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess

import huggingface_hub.constants
from PIL import Image
import pytest

import fakes
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


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
  """Tiny random-weight Hugging Face folders of the three model families the stages start from."""
  root = tmp_path_factory.mktemp("hf_folders")
  folders = {name: str(root / name) for name in ("bert", "resnet", "clip")}
  fakes.save_tiny_hf_bert(folders["bert"])
  fakes.save_tiny_hf_resnet(folders["resnet"])
  fakes.save_tiny_hf_clip(folders["clip"])
  return folders


@pytest.fixture
def stage_runs(monkeypatch):
  """The stages that ran: every stage's run is replaced by a recorder that creates its folder, so
  a check that lets a job through shows here (and in the workdir), having trained nothing."""
  ran = []

  def record(config, root, name):
    os.makedirs(workdir.stage_dir(root, name), exist_ok=True)
    ran.append(name)

  for name, stage in pipeline.REGISTRY.items():
    monkeypatch.setitem(pipeline.REGISTRY, name, dataclasses.replace(
        stage, run=lambda config, root, name=name: record(config, root, name)))
  monkeypatch.setattr(pipeline, "_reuse", lambda root, stage, config: False)
  return ran


def _paper_job(folders, data_dir, **checkpoints):
  """The paper's main job (`toyshop,paper`) from the tiny folders; `checkpoints` override flags."""
  config = meta.get_config("toyshop,paper")
  config.data.data_dir = data_dir
  flags = {"text_checkpoint": folders["bert"], "image_checkpoint": folders["resnet"],
           "clip_checkpoint": folders["clip"], **checkpoints}
  for flag, value in flags.items():
    config[flag] = value
  return config


def _refused(config, job) -> str:
  """The one error of `pipeline.run`, after which nothing is in the workdir."""
  with pytest.raises(config_checks.ConfigError) as error:
    pipeline.run(config, str(job))
  assert not os.path.exists(job)
  return str(error.value)


def test_the_paper_job_from_usable_folders_passes_its_checkpoint_checks(tmp_path, hf_folders):
  pipeline.validate(_paper_job(hf_folders, str(tmp_path / "tfds")), num_devices=2,
                    root=str(tmp_path / "job"))


@pytest.mark.parametrize("flag,setting,folder,holds", [
    ("image_checkpoint", "stages.image.init_from", "clip", "holds a 'clip' model"),
    ("clip_checkpoint", "stages.mmbt.init_from_image", "bert", "holds a 'bert' model"),
    ("image_checkpoint", "stages.image.init_from", None, "no such folder or file"),
])
def test_a_wrong_checkpoint_fails_the_main_job_before_any_stage_runs(
    tmp_path, hf_folders, stage_runs, flag, setting, folder, holds):
  path = hf_folders[folder] if folder else str(tmp_path / "no_such_folder")
  job = tmp_path / "job"
  message = _refused(_paper_job(hf_folders, str(tmp_path / "tfds"), **{flag: path}), job)
  assert stage_runs == []
  assert message.startswith(f"config.stage='meta': {flag} ({setting})={path!r}: {holds}")
  assert "\n" not in message  # The one problem, on one line.


def test_every_wrong_checkpoint_is_listed_in_one_error_naming_its_flag_and_what_it_holds(
    tmp_path, hf_folders, stage_runs):
  missing = str(tmp_path / "no_such_bert")
  config = _paper_job(hf_folders, str(tmp_path / "tfds"), text_checkpoint=missing,
                      image_checkpoint=hf_folders["clip"], clip_checkpoint=hf_folders["bert"])
  config.stages.mmbt.model.num_image_embeddings = 5  # A setting's problem is in the same list.
  message = _refused(config, tmp_path / "job")
  assert stage_runs == []
  assert "4 setting(s) cannot work" in message
  # One problem of a shared flag is listed once, naming every stage setting it sets.
  assert (f"text_checkpoint (stages.text.init_from, stages.mmbt.init_from_text)={missing!r}: no "
          "such folder or file.") in message
  assert (f"image_checkpoint (stages.image.init_from)={hf_folders['clip']!r}: holds a 'clip' model "
          "(its config.json's model_type), but the image learner's model.kind='resnet' starts "
          "from a 'resnet' checkpoint: use model.kind='clip' or another checkpoint.") in message
  assert (f"clip_checkpoint (stages.mmbt.init_from_image)={hf_folders['bert']!r}: holds a 'bert' "
          "model (its config.json's model_type), but the MMBT's image tower "
          "(model.image_tower='clip') starts from a 'clip' or 'clip_vision_model' checkpoint.") in (
              message)
  assert "stages.mmbt.model.num_image_embeddings=5" in message


def test_a_stage_run_alone_refuses_a_bert_folder_as_its_clip_tower_by_name(tmp_path, hf_folders,
                                                                           stage_runs):
  config = mmbt.get_config("toyshop,paper")
  config.update(init_from_text=hf_folders["bert"], init_from_image=hf_folders["bert"])
  message = _refused(config, tmp_path / "job")
  assert stage_runs == []
  assert f"init_from_image={hf_folders['bert']!r}: holds a 'bert' model" in message


def test_a_text_tower_without_its_tokenizer_and_sizes_that_do_not_fit_are_reported(
    tmp_path, hf_folders, stage_runs):
  bare = fakes.save_tiny_hf_bert(str(tmp_path / "bert_without_vocabulary"), vocabulary=False)
  config = _paper_job(hf_folders, str(tmp_path / "tfds"), text_checkpoint=bare)
  config.stages.mmbt.init_from_text_layers = 3  # The checkpoint has 2.
  config.stages.mmbt.data.image_size = 100  # Not a multiple of the CLIP tower's 8-pixel patches.
  message = _refused(config, tmp_path / "job")
  assert stage_runs == []
  assert (f"text_checkpoint (stages.text.init_from)={bare!r}: no tokenizer.json or vocab.txt in "
          f"{bare}: the text learner reads the titles with its checkpoint's tokenizer") in message
  assert (f"text_checkpoint (stages.mmbt.init_from_text)={bare!r}: num_hidden_layers=3, but the "
          "checkpoint has 2 layers") in message
  assert (f"clip_checkpoint (stages.mmbt.init_from_image)={hf_folders['clip']!r}: "
          "CLIPVisionConfig: image_size=100 is not a multiple of patch_size=8") in message
  # With a vocabulary: the MMBT's titles longer than the tower has positions (128).
  config.text_checkpoint = hf_folders["bert"]
  config.stages.mmbt.init_from_text_layers = 0
  config.stages.mmbt.data.update(image_size=96, max_length=200)
  message = _refused(config, tmp_path / "job")
  assert message.startswith(f"config.stage='meta': text_checkpoint (stages.mmbt.init_from_text)="
                            f"{hf_folders['bert']!r}: its 128 token positions are fewer than "
                            "data.max_length=200")


def test_a_workdir_path_an_earlier_stage_writes_is_left_to_it_unless_it_is_there(tmp_path,
                                                                               hf_folders):
  job = str(tmp_path / "job")
  config = _paper_job(hf_folders, str(tmp_path / "tfds"), clip_checkpoint="workdir:image/export")
  config.stages.mmbt.model.image_tower = "resnet"
  pipeline.validate(config, num_devices=2, root=job)  # The image stage will write it.
  with pytest.raises(config_checks.ConfigError, match=r"init_from_image='workdir:image/export': "
                                                      r".*job/image/export does not exist: run "):
    pipeline.validate(config.stages.mmbt, num_devices=2, root=job)  # Alone, it must be there.
  config.stages.mmbt.init_from_image = "workdir:image/exported"  # Not a path the image stage writes.
  with pytest.raises(config_checks.ConfigError, match=r"image/exported does not exist, and no "
                                                      r"earlier stage of this job writes it"):
    pipeline.validate(config, num_devices=2, root=job)
  # A finished image stage's export is checked: a CLIP tower for the MMBT's ResNet tower is not.
  config.stages.mmbt.init_from_image = "workdir:image/export"
  fakes.save_tiny_hf_clip(os.path.join(job, "image", "export"))
  with pytest.raises(config_checks.ConfigError, match=r"clip_checkpoint \(stages.mmbt."
                                                      r"init_from_image\)='workdir:image/export': "
                                                      r"holds a 'clip' model"):
    pipeline.validate(config, num_devices=2, root=job)
  config.rerun = "image"  # Unless the job writes it again.
  pipeline.validate(config, num_devices=2, root=job)


def test_hub_names_not_in_the_cache_are_reported_offline(tmp_path, monkeypatch):
  """The paper's checkpoints by hub name, offline with an empty cache: each fails now, as its
  stage would."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  config = meta.get_config("taimd17k,paper")
  pipeline.validate(config, num_devices=8)  # The settings alone (no workdir) read no checkpoint.
  with pytest.raises(config_checks.ConfigError) as error:
    pipeline.validate(config, num_devices=8, root=str(tmp_path / "job"))
  message = str(error.value)
  assert "3 setting(s) cannot work" in message
  for flag, name in (("text_checkpoint", "bert-base-uncased"),
                     ("image_checkpoint", "microsoft/resnet-152"),
                     ("clip_checkpoint", "openai/clip-vit-base-patch32")):
    assert f"{flag} (" in message and (f"={name!r}: not a local folder, and the Hugging Face hub "
                                       "could not provide it") in message


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
