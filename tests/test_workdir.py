"""The workdir layout: `workdir:` paths, atomic writes, finished stages and config differences."""

import json
import os
import shutil
import socket
import subprocess

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


def test_a_folder_written_atomically_is_whole_or_the_old_one(tmp_path):
  target = str(tmp_path / "export")

  def write(files):
    def into(folder):
      os.makedirs(folder)
      for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
          f.write(content)
    return into

  workdir.write_folder_atomically(target, write({"config.json": "1", "model.safetensors": "1"}))

  def crash(folder):
    write({"model.safetensors": "2"})(folder)
    raise KeyboardInterrupt  # Before config.json: the new folder is half written.

  with pytest.raises(KeyboardInterrupt):
    workdir.write_folder_atomically(target, crash)
  assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
  with open(os.path.join(target, "model.safetensors")) as f:
    assert f.read() == "1"


def test_missing_lists_the_final_files_not_written_yet(tmp_path):
  root = str(tmp_path)
  names = ("metrics.json", "logits_test.npz")
  os.makedirs(workdir.stage_dir(root, "text"))
  open(workdir.path(root, "text", names[0]), "w").close()
  assert workdir.missing(root, "text", names) == [workdir.path(root, "text", names[1])]


def _fingerprint(root, **changes):
  config = text.get_config()
  for key, value in changes.items():
    config[key] = value
  return workdir.fingerprint(config, root, data="toyshop/a/1.0.0", class_names=["x", "y"],
                             reads={"clip_pretrain": "run1"})


def test_a_fingerprint_ignores_bookkeeping_and_names_what_changed(tmp_path):
  root = str(tmp_path)
  saved = _fingerprint(root)
  assert workdir.fingerprint_differences(saved, _fingerprint(root, log_every_steps=7, mode="eval",
                                                             keep_checkpoints=9)) == ([], [])
  other = {**_fingerprint(root, num_epochs=3), "data": "toyshop/b/1.0.0", "class_names": ["x"],
           "reads": {"clip_pretrain": "run2"}}
  inputs, reads = workdir.fingerprint_differences(saved, other)
  assert inputs == ["num_epochs: 8 there, 3 now", "dataset: toyshop/a/1.0.0 there, toyshop/b/1.0.0 now",
                    'class names: ["x", "y"] there, ["x"] now']
  assert reads == ["clip_pretrain was built again since"]


def test_a_stage_folder_is_claimed_once_and_refused_to_other_inputs(tmp_path):
  root = str(tmp_path)
  workdir.claim(root, "text", _fingerprint(root), training=True)
  run = workdir.run_of(root, "text")
  workdir.claim(root, "text", _fingerprint(root), training=False)  # Same inputs: fine, same run.
  assert workdir.run_of(root, "text") == run
  with pytest.raises(workdir.StaleStageError, match=r"text was built from other inputs than this "
                                                    r"run's \(num_epochs: 8 there, 3 now\).*"
                                                    r"--config.rerun=text"):
    workdir.claim(root, "text", _fingerprint(root, num_epochs=3), training=True)


def test_a_copied_workdir_keeps_its_stages_and_older_absolute_fingerprints_still_match(tmp_path):
  first, copy = str(tmp_path / "a"), str(tmp_path / "b")

  def current(root, config=mmbt.get_config("fashion")):  # init_from_image=workdir:clip_pretrain/export
    return workdir.fingerprint(config, root, data="d/1", class_names=["x"],
                               reads={"clip_pretrain": "run1"})

  workdir.claim(first, "mmbt", current(first), training=True)
  shutil.copytree(first, copy)
  workdir.claim(copy, "mmbt", current(copy), training=False)  # Not stale: same inputs, elsewhere.
  assert workdir.read_fingerprint(copy, "mmbt")["config"]["init_from_image"] == (
      "workdir:clip_pretrain/export")
  # The resolved spelling of the same checkpoint is the same input.
  workdir.claim(copy, "mmbt", current(copy, workdir.resolve_paths(mmbt.get_config("fashion"), copy)),
                training=False)
  # Older versions saved the resolved path; in place it still matches.
  old = current(first)
  old["config"]["init_from_image"] = os.path.join(first, "clip_pretrain", "export")
  workdir.write_json(workdir.path(first, "mmbt", workdir.FINGERPRINT), {**old, "run": "r"})
  workdir.claim(first, "mmbt", current(first), training=False)
  # A checkpoint outside the workdir (the first one's, read from the copy) is another input.
  with pytest.raises(workdir.StaleStageError, match=r"init_from_image: 'workdir:clip_pretrain/"
                                                    r"export' there, '/.*/a/clip_pretrain/export' now"):
    workdir.claim(copy, "mmbt", current(copy, workdir.resolve_paths(mmbt.get_config("fashion"), first)),
                  training=False)


def test_a_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
  directory = str(tmp_path / "text")
  with workdir.StageLock(directory):
    with pytest.raises(workdir.WorkdirBusy, match=rf"another job \(process {os.getpid()} on "):
      with workdir.StageLock(directory):
        pass
  assert not os.path.exists(os.path.join(directory, workdir.LOCK))  # Released.
  with subprocess.Popen(["true"]) as gone:
    gone.wait()
  workdir.write_json(os.path.join(directory, workdir.LOCK),
                     {"pid": gone.pid, "host": socket.gethostname(), "since": 0})
  with workdir.StageLock(directory) as lock:
    assert lock.held


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
