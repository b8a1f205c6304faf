"""Several processes: two CPU processes joined by `jax.distributed` over loopback (gloo
collectives) train the text stage, and run the main job's mmshap and meta stages, as one process
with two devices does."""

import json
import os
import re
import zipfile

import event_files
import jax
import numpy as np
import pytest
import train_subprocess

from jmmshap import builders, input_pipeline, mmshap, mmshap_stage, parallel, pipeline

STEPS = {"total_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 2}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny):
  """(one process with 2 devices, 2 processes with 1 device each) workdirs of the same config."""
  root = tmp_path_factory.mktemp("distributed")
  overrides = tiny.overrides("text", str(root / "tfds"), STEPS)
  config = tiny.config("text", str(root / "tfds"), STEPS)
  builders.prepare(config.data)  # Before the processes start, so none of them builds it.
  single, multi = str(root / "single"), str(root / "multi")
  address = f"127.0.0.1:{train_subprocess.free_port()}"
  env = train_subprocess.cpu_env(device_count=1)
  processes = []
  for index in range(2):
    command = train_subprocess.train_command(
        multi, overrides, f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={index}")
    processes.append(train_subprocess.start(command, env, str(root / f"process{index}.log")))
  try:
    assert jax.device_count() == 2 and jax.process_count() == 1
    pipeline.run(config, single)  # Here, while the two processes run.
  finally:
    train_subprocess.finish_all(processes)  # Both logs on failure; never leaves a process behind.
  return single, multi


def test_two_processes_end_with_the_params_of_one_process_on_two_devices(two_runs):
  single, multi = two_runs
  final = STEPS["total_steps"]
  ours, theirs = (train_subprocess.checkpoint_params(w, final) for w in (multi, single))
  assert len(ours) == len(theirs) > 0
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for split in ("validation", "test"):
    logits = [np.load(os.path.join(w, "text", f"logits_{split}.npz")) for w in (multi, single)]
    np.testing.assert_allclose(logits[0]["logits"], logits[1]["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[0]["ids"], logits[1]["ids"])  # Every id, in split order.


def test_reports_are_written_once(two_runs):
  single, multi = two_runs
  logs = []
  for workdir in (multi, single):
    with open(os.path.join(workdir, "text", "log.jsonl")) as f:
      logs.append([json.loads(line) for line in f])
  assert [(r["split"], r["step"]) for r in logs[0]] == [("train", 2), ("train", 4), ("validation", 4)]
  for ours, theirs in zip(*logs):
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
  stage = os.path.join(multi, "text")
  assert not [name for name in os.listdir(stage) if ".partial-" in name]
  # One event file (named with its process id: a second writer would add one), log.jsonl's numbers.
  assert event_files.scalars(event_files.only(stage)) == event_files.logged(logs[0])
  with open(os.path.join(stage, "metrics.json")) as f:
    assert set(json.load(f)) == {"validation", "test"}


def test_process_slices_make_up_the_single_process_batch(monkeypatch):
  source = [{"row": i} for i in range(23)]
  rows = lambda records: {"row": np.asarray([r["row"] for r in records])}

  def batches(process_index, process_count):
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    monkeypatch.setattr(jax, "process_count", lambda: process_count)
    train = input_pipeline.loader(source, rows, input_pipeline.TrainOrder(23, 8, 3),
                                  global_batch_size=8, start=1, stop=5)
    train = [batch["row"] for batch in train]  # 2 steps per epoch: crosses two epochs.
    evaluation = list(input_pipeline.eval_batches(source, rows, global_batch_size=8))
    return train, [(b["row"], b["index"], b["mask"]) for b in evaluation]

  whole_train, whole_eval = batches(0, 1)
  (train0, eval0), (train1, eval1) = batches(0, 2), batches(1, 2)
  assert len(whole_train) == 4
  for whole, first, second in zip(whole_train, train0, train1, strict=True):
    assert len(first) == len(second) == 4 and not set(first) & set(second)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
  for whole, first, second in zip(whole_eval, eval0, eval1):
    for field, a, b in zip(whole, first, second):
      np.testing.assert_array_equal(np.concatenate([a, b]), field)


@pytest.fixture
def initialize_calls(monkeypatch):
  """jax.distributed.initialize, recorded instead of run."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in (*parallel._SLURM_STEP, parallel._OPEN_MPI, "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  return calls


def _slurm_step(monkeypatch, tasks: int):
  for name, value in {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "gpu[01-02]",
                      "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(name, value)


def test_single_process_unless_asked_or_launched_as_several(initialize_calls, monkeypatch):
  assert not parallel.initialize_distributed()
  _slurm_step(monkeypatch, tasks=1)
  assert not parallel.initialize_distributed()
  _slurm_step(monkeypatch, tasks=4)
  assert not parallel.initialize_distributed(num_processes=1)
  assert initialize_calls == []


def test_cluster_job_is_detected_and_flags_are_passed_on(initialize_calls, monkeypatch):
  _slurm_step(monkeypatch, tasks=4)
  assert parallel.cluster_process_count() == 4
  assert parallel.initialize_distributed()
  assert parallel.initialize_distributed(local_device_ids=[0, 1, 2, 3])
  detected = {"coordinator_address": None, "num_processes": None, "process_id": None}
  assert initialize_calls == [{**detected, "local_device_ids": None},
                              {**detected, "local_device_ids": [0, 1, 2, 3]}]
  monkeypatch.delenv("SLURM_STEP_NODELIST")  # The batch script itself, outside `srun`.
  assert parallel.cluster_process_count() is None
  monkeypatch.setenv(parallel._OPEN_MPI, "1234.0;tcp://10.0.0.1:5000")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert parallel.cluster_process_count() == 2


def test_explicit_flags_outside_a_cluster_must_be_complete(initialize_calls):
  with pytest.raises(ValueError, match="--num_processes, --process_id"):
    parallel.initialize_distributed(coordinator_address="10.0.0.1:1234")
  assert parallel.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=1)
  assert initialize_calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                               "process_id": 1, "local_device_ids": None}]


# --------------------------------------------------------------------------------------------------
# The main job's mmshap and meta stages.


class _RowNumbers:
  """What `mmshap_stage._groups` needs of a preprocessor, for records that hold their row number."""

  def __call__(self, records):
    return {"row": np.asarray([r["row"] for r in records])}

  def normalised(self, batch):
    return batch


def _process_parts(monkeypatch, count: int) -> list[dict[str, np.ndarray]]:
  """Each of 2 processes' (positions, rows) of the first `count` of 21 records, in groups of 8."""
  source = [{"row": i} for i in range(21)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    groups = list(mmshap_stage._groups(source, count, 8, _RowNumbers(), worker_count=0))
    part = {"positions": np.concatenate([p for p, _ in groups]) if groups else np.zeros(0, int),
            "rows": np.concatenate([b["row"] for _, b in groups]) if groups else np.zeros(0, int)}
    assert len(part["positions"]) == mmshap_stage.process_share(count, 8)
    parts.append(part)
  return parts


def test_processes_explain_disjoint_shares_that_merge_back_into_split_order(monkeypatch):
  first, second = _process_parts(monkeypatch, 19)
  np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18])
  np.testing.assert_array_equal(second["positions"], [4, 5, 6, 7, 12, 13, 14, 15])
  for part in (first, second):
    np.testing.assert_array_equal(part["rows"], part["positions"])
  np.testing.assert_array_equal(mmshap_stage._split_order([second, first])["rows"], np.arange(19))
  first, second = _process_parts(monkeypatch, 3)  # Process 1 has no row: it explains nothing.
  assert len(second["positions"]) == 0
  np.testing.assert_array_equal(mmshap_stage._split_order([first, second])["rows"], [0, 1, 2])


def test_each_process_takes_its_share_of_a_group_and_of_a_call(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert jax.local_device_count() == 2  # 4 devices in all.
  given = mmshap_stage.process_options(mmshap.Options(examples_per_group=8, chunk_size=64))
  assert (given.examples_per_group, given.chunk_size) == (4, 32)
  default = mmshap_stage.process_options(mmshap.Options(examples_per_group=8))
  assert default.chunk_size == mmshap.DEFAULT_CHUNK_ROWS["cpu"] // 2


# Early stopping: the meta-models also predict their held-out rows during training.
@pytest.fixture(scope="module")
def main_jobs(tmp_path_factory, tiny, tiny_learners, tiny_main_job):
  """(one process with 2 devices, 2 processes with 1 device each, the processes' logs) workdirs of
  the tiny main job: the session's (run in this process) and one run here as two processes on a
  copy of the same learners, which runs mmshap and meta itself."""
  single, _ = tiny_main_job
  root = tmp_path_factory.mktemp("distributed_main_job")
  multi = str(root / "multi")
  data_dir = tiny_learners(multi)
  address = f"127.0.0.1:{train_subprocess.free_port()}"
  env = train_subprocess.cpu_env(device_count=1)
  logs = [str(root / f"main_job{index}.log") for index in range(2)]
  processes = [train_subprocess.start(
      train_subprocess.train_command(multi, tiny.pipeline_overrides(data_dir, tiny.MAIN_JOB),
                                     f"--coordinator_address={address}", "--num_processes=2",
                                     f"--process_id={index}", config="configs/meta.py"),
      env, logs[index]) for index in range(2)]
  train_subprocess.finish_all(processes)
  return single, multi, logs


def _shares_path(workdir: str, split: str) -> str:
  return os.path.join(workdir, mmshap_stage.STAGE, f"mmshap_{split}.npz")


def _shares(workdir: str, split: str) -> dict[str, np.ndarray]:
  with np.load(_shares_path(workdir, split)) as data:
    return {key: data[key] for key in data.files}


def test_two_processes_explain_every_example_as_one_process_does(main_jobs):
  single, multi, _ = main_jobs
  for split in ("validation", "test"):
    ours, theirs = _shares(multi, split), _shares(single, split)
    assert sorted(ours) == sorted(theirs) and len(theirs["ids"]) == 24
    np.testing.assert_allclose(ours["phi"], theirs["phi"], rtol=0, atol=1e-6)
    for key in theirs:  # Every array identical, dtype included (in split order: ids first).
      assert ours[key].dtype == theirs[key].dtype, key
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # The files, byte for byte, but for the time np.savez stamps on each zip entry.
    with zipfile.ZipFile(_shares_path(multi, split)) as a, \
        zipfile.ZipFile(_shares_path(single, split)) as b:
      assert [(i.filename, a.read(i)) for i in a.infolist()] == \
          [(i.filename, b.read(i)) for i in b.infolist()]


def test_each_process_explains_half_of_each_split(main_jobs):
  single, multi, logs = main_jobs
  for index, log in enumerate(logs):
    with open(log) as f:
      said = re.findall(r"mmshap (\w+): process (\d) of 2 explained (\d+) of (\d+) examples", f.read())
    assert sorted(said) == [("test", str(index), "12", "24"), ("validation", str(index), "12", "24")]
  for workdir, shares in ((multi, [12, 12]), (single, [24])):
    summary = json.load(open(os.path.join(workdir, mmshap_stage.STAGE, "summary.json")))
    for split in ("validation", "test"):
      assert summary["splits"][split]["examples_per_process"] == shares
  histograms = event_files.histograms(event_files.only(os.path.join(multi, mmshap_stage.STAGE)))
  assert {key: [h.num for h in found] for key, found in histograms.items()} == {
      ("t_shap/validation", 0): [24], ("t_shap/test", 0): [24]}  # Process 0's, of every example.


def test_meta_stage_on_two_processes_reports_as_one_process(main_jobs):
  single, multi, _ = main_jobs
  ours, theirs = (os.path.join(workdir, "meta") for workdir in (multi, single))
  assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))  # No partial files either.
  for name in ("metrics.json", "training.json", "selection.json", "report.md"):
    with open(os.path.join(ours, name)) as a, open(os.path.join(theirs, name)) as b:
      assert a.read() == b.read(), name
  for method in ("stacked", "mmshap_dataset", "mmshap_sample"):
    with open(os.path.join(ours, method, "log.jsonl")) as a, \
        open(os.path.join(theirs, method, "log.jsonl")) as b:
      log = a.read()
      assert log == b.read(), method  # Logged once, by process 0: the same losses.
    written = event_files.scalars(event_files.only(os.path.join(ours, method)))  # One writer.
    assert written == event_files.logged(map(json.loads, log.splitlines())), method
  with np.load(os.path.join(ours, "predictions_test.npz")) as a, \
      np.load(os.path.join(theirs, "predictions_test.npz")) as b:
    for key in b.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
