"""The workdir layout: `workdir:` paths, atomic writes, finished stages and config differences."""

import json
import os

import pytest

from configs import common, mmbt, text
from jmmshap import workdir


def test_workdir_paths_resolve_inside_the_run_and_other_paths_stay():
  config = mmbt.get_config("fashion")
  resolved = workdir.resolve_paths(config, "/runs/a")
  assert resolved.init_from_image == "/runs/a/clip_pretrain/export"
  assert resolved.init_from_text == config.init_from_text == common.MINILM
  assert config.init_from_image == "workdir:clip_pretrain/export"
  assert workdir.stages_referenced(config) == {"clip_pretrain"}
  assert workdir.stages_referenced(mmbt.get_config("toyshop")) == set()


def test_an_atomic_write_cut_short_leaves_the_old_file(tmp_path):
  target = str(tmp_path / "metrics.json")
  workdir.write_json(target, {"step": 1})

  def crash(partial):
    with open(partial, "w") as f:
      f.write('{"step": ')
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    workdir.write_atomically(target, crash)
  assert workdir.read_json(target) == {"step": 1}


def test_a_stage_is_finished_when_every_final_file_exists(tmp_path):
  root = str(tmp_path)
  names = ("metrics.json", "logits_test.npz")
  assert workdir.finished_at(root, "text", names) is None
  os.makedirs(workdir.stage_dir(root, "text"))
  for name in names:
    open(workdir.path(root, "text", name), "w").close()
  assert workdir.missing(root, "text", names) == []
  assert workdir.finished_at(root, "text", names) >= workdir.written_at(root, "text", names)


def test_config_differences_name_each_changed_setting_but_not_the_mode(tmp_path):
  root = str(tmp_path)
  config = text.get_config()
  os.makedirs(workdir.stage_dir(root, "text"))
  with open(workdir.path(root, "text", workdir.CONFIG), "w") as f:
    f.write(config.to_json())
  assert workdir.config_differences(root, "text", config) == []
  config.mode = "eval"
  config.num_epochs = 3
  assert workdir.config_differences(root, "text", config) == ["num_epochs: 8 there, 3 now"]
  assert workdir.config_differences(root, "image", config) == []  # Nothing saved, nothing differs.
  assert json.loads(config.to_json())["num_epochs"] == 3
