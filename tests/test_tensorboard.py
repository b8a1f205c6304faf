"""TensorBoard event files: a folder's one file holds the records it was opened with and those logged
after; reopening replaces it; only process 0 writes; the import loads no torch. The stages' files
are read back in the tests of their stages (test_train_lib.py, test_meta.py, test_mmshap_stage.py)."""

import os
import subprocess
import sys

import event_files
import jax
import numpy as np
import pytest

from jmmshap import tensorboard, train_lib

TRAIN = {"split": "train", "step": 2, "loss": 1.5, "accuracy": 0.25, "learning_rate": 0.01,
         "examples_per_sec": None}
VALIDATION = {"split": "validation", "step": 2, "loss": 1.25, "accuracy": 0.5, "f1_macro": 0.4}
LATER = {"split": "train", "step": 4, "loss": 0.75, "accuracy": 0.5, "learning_rate": 0.005,
         "examples_per_sec": 123.0}


def test_scalars_are_a_records_numbers_tagged_split_slash_name():
  assert tensorboard.scalars(TRAIN) == {"train/loss": 1.5, "train/accuracy": 0.25,
                                        "train/learning_rate": 0.01}
  assert tensorboard.scalars(VALIDATION) == {"validation/loss": 1.25, "validation/accuracy": 0.5,
                                             "validation/f1_macro": 0.4}


def test_a_folder_holds_one_file_with_the_records_replayed_then_those_logged(tmp_path):
  """Opened with the records kept so far (a resumed run's), then a logged one: one file holding
  exactly those."""
  with tensorboard.Events(str(tmp_path), [TRAIN, VALIDATION]) as events:
    events.log(LATER)
  events = event_files.only(str(tmp_path))
  assert events[0].file_version == "brain.Event:2"
  assert event_files.scalars(events) == event_files.logged([TRAIN, VALIDATION, LATER])


def test_reopening_replaces_the_earlier_file_with_the_records_given(tmp_path):
  """What a resumed run does: its predecessor (another process, earlier) logged past the checkpoint
  (LATER); the new file holds the kept records only, and the old one is gone."""
  with tensorboard.Events(str(tmp_path), [TRAIN, VALIDATION, LATER]):
    pass
  (written,) = event_files.paths(str(tmp_path))
  os.rename(written, tmp_path / "events.out.tfevents.1700000000.elsewhere.1")
  with tensorboard.Events(str(tmp_path), [TRAIN]):
    pass
  assert event_files.scalars(event_files.only(str(tmp_path))) == event_files.logged([TRAIN])


def test_logger_writes_each_record_to_the_event_file_and_a_truncated_log_replaces_it(tmp_path):
  path = str(tmp_path / "log.jsonl")
  logger = train_lib.Logger(path)
  for record in (TRAIN, VALIDATION, LATER):
    logger.write(record)
  # Readable before the logger closes: every record is flushed, as its log.jsonl line is.
  assert event_files.scalars(event_files.only(str(tmp_path))) == event_files.logged(
      [TRAIN, VALIDATION, LATER])
  logger.close()
  resumed = train_lib.Logger(path)
  resumed.truncate_after(2)
  assert event_files.scalars(event_files.only(str(tmp_path))) == event_files.logged(
      [TRAIN, VALIDATION, LATER])  # Nothing written yet: the folder is as it was.
  resumed.write({**LATER, "loss": 0.5})
  resumed.close()
  assert event_files.scalars(event_files.only(str(tmp_path))) == event_files.logged(
      [TRAIN, VALIDATION, {**LATER, "loss": 0.5}])


def test_only_process_0_writes_event_files(tmp_path, monkeypatch):
  """On another process an Events writes, replaces and deletes nothing, and a Logger opens none."""
  with tensorboard.Events(str(tmp_path), [TRAIN]):
    pass
  (earlier,) = event_files.paths(str(tmp_path))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with tensorboard.Events(str(tmp_path), [VALIDATION]) as events:
    assert not events.writing
    events.log(LATER)
    events.scalar("t_shap_mean/test", 0.5, step=0)
    events.histogram("t_shap/test", np.asarray([0.5]), step=0)
  logger = train_lib.Logger(str(tmp_path / "log.jsonl"))
  logger.write(LATER)
  logger.close()
  assert event_files.paths(str(tmp_path)) == [earlier]
  assert event_files.scalars(event_files.read(earlier)) == event_files.logged([TRAIN])
  assert not os.path.exists(tmp_path / "log.jsonl")
  other = tmp_path / "other"
  tensorboard.Events(str(other), [TRAIN]).close()
  assert not other.exists()


def test_histogram_counts_the_finite_values_only(tmp_path):
  """TensorBoard's histograms cannot hold NaN (an undefined T-SHAP share): they are left out."""
  values = np.asarray([0.1, np.nan, 0.3, 0.9, 0.95])
  with tensorboard.Events(str(tmp_path)) as events:
    events.histogram("t_shap/test", values, step=0, bins=np.linspace(0, 1, 21))
    events.histogram("t_shap/none", np.asarray([np.nan]), step=0)
  found = event_files.histograms(event_files.only(str(tmp_path)))
  assert list(found) == [("t_shap/test", 0)]
  (histogram,) = found[("t_shap/test", 0)]
  assert histogram.num == 4 == sum(histogram.bucket)
  assert histogram.sum == pytest.approx(2.25)
  assert (histogram.min, histogram.max) == (0.1, 0.95)


def test_importing_the_package_loads_neither_torch_nor_tensorflow():
  """tensorboardX's writer would import torch where it is installed (the test extra installs it)."""
  code = ("import sys; import jmmshap.pipeline, jmmshap.predictor, jmmshap.tensorboard; "
          "print(sorted(name for name in ('torch', 'tensorflow') if name in sys.modules))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  output = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root}, check=True, timeout=300)
  assert output.stdout.strip().splitlines()[-1] == "[]"
