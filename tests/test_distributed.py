"""Multi-process training: two CPU processes joined by `jax.distributed` over loopback (gloo
collectives) train the text stage as one process with two devices does."""

import json
import os

import jax
import numpy as np
import pytest
import train_subprocess

from jmmshap import builders, input_pipeline, parallel, pipeline

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
