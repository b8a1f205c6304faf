"""Crash safety: a run killed with SIGKILL, restarted with the same command, ends where an
uninterrupted run does; a save cut short never costs the checkpoint before it."""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import train_subprocess

from jmmshap import builders

# Two grain workers read the batches: the resumed run restores their saved iterator state.
STEPS = {"total_steps": 30, "eval_every_steps": 30, "checkpoint_every_steps": 5,
         "log_every_steps": 5, "data.worker_count": 2}
TOTAL = STEPS["total_steps"]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, tiny):
  """An uninterrupted run, and the same command SIGKILLed after its first checkpoint, then rerun."""
  root = tmp_path_factory.mktemp("crash")
  overrides = tiny.overrides("text", str(root / "tfds"), STEPS)
  builders.prepare(tiny.config("text", str(root / "tfds"), STEPS).data)
  # The runs share compiled programs: only the first one compiles.
  env = train_subprocess.cpu_env(device_count=2, compilation_cache=str(root / "jax_cache"))

  def run(workdir, name):
    log = str(root / f"{name}.log")
    train_subprocess.finish(train_subprocess.start(
        train_subprocess.train_command(workdir, overrides), env, log))
    with open(log, errors="replace") as f:
      return f.read()

  uninterrupted = str(root / "uninterrupted")
  run(uninterrupted, "uninterrupted")

  workdir = str(root / "killed")
  stage = os.path.join(workdir, "text")
  # JAX writes a compilation-cache entry in place: a SIGKILL mid-write leaves a truncated entry
  # that a later run would load. The killed run compiles into a copy of the cache, never the one
  # the restarted run reads.
  shutil.copytree(root / "jax_cache", root / "jax_cache_killed")
  killed_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache_killed")}
  process = train_subprocess.start(train_subprocess.train_command(workdir, overrides), killed_env,
                                   str(root / "killed.log"))
  deadline = time.monotonic() + 300
  while process.poll() is None and not train_subprocess.finished_steps(
      os.path.join(stage, "checkpoints")):
    assert time.monotonic() < deadline, "no checkpoint within 300 s"
    time.sleep(0.02)
  workers = train_subprocess.descendants(process.pid)
  process.send_signal(signal.SIGKILL)  # The run alone, as the kernel's OOM killer would.
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  deadline = time.monotonic() + 30
  while any(map(train_subprocess.running, workers)) and time.monotonic() < deadline:
    time.sleep(0.1)
  left_behind = [pid for pid in workers if train_subprocess.running(pid)]
  for pid in left_behind:  # Never leave them running, whatever the test then says.
    os.kill(pid, signal.SIGKILL)
  good = train_subprocess.finished_steps(os.path.join(stage, "checkpoints"))[-1]
  assert good < TOTAL and not os.path.exists(os.path.join(stage, "metrics.json"))

  # What a kill inside Orbax's save leaves, unless this kill already did: the next step's files,
  # half written, in the temporary folder that becomes "<step>" only once complete; in best/ too.
  cut_short = [os.path.join(stage, folder, f"{good + STEPS['checkpoint_every_steps']}"
                                           ".orbax-checkpoint-tmp") for folder in ("checkpoints", "best")]
  for partial in cut_short:
    if not os.path.exists(partial):
      shutil.copytree(os.path.join(stage, "checkpoints", str(good)), partial)
      for parent, _, files in os.walk(partial):
        for name in files:
          path = os.path.join(parent, name)
          os.truncate(path, os.path.getsize(path) // 2)

  output = run(workdir, "restarted")
  return uninterrupted, workdir, good, cut_short, output, (workers, left_behind)


def test_sigkilled_run_restarted_ends_with_the_uninterrupted_params(restarted):
  uninterrupted, workdir, _, _, _, _ = restarted
  for ours, theirs in zip(train_subprocess.checkpoint_params(workdir, TOTAL),
                          train_subprocess.checkpoint_params(uninterrupted, TOTAL), strict=True):
    np.testing.assert_array_equal(ours, theirs)
  reports = []
  for directory in (workdir, uninterrupted):
    with open(os.path.join(directory, "text", "metrics.json")) as f:
      reports.append(json.load(f))
  assert reports[0] == reports[1]
  with open(os.path.join(workdir, "text", "log.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == list(range(5, TOTAL + 1, 5))  # Nothing logged twice, nothing lost.


def test_save_cut_short_leaves_the_previous_checkpoint_to_resume_from(restarted):
  _, _, good, cut_short, output, _ = restarted
  assert f"resumed from step {good} of {TOTAL}" in output
  assert "grain's iterator state restored (2 workers, first step 0)" in output
  assert not any(os.path.exists(path) for path in cut_short)  # Deleted, never restored.


def test_grain_workers_of_a_killed_run_end_with_it(restarted):
  """The SIGKILLed run had its two grain workers (and multiprocessing's resource tracker); none is
  left running once the run is gone."""
  *_, (workers, left_behind) = restarted
  assert len(workers) >= 2
  assert not left_behind


# --------------------------------------------------------------------------------------------------
# The main job killed while it writes the MM-SHAP shares, or the meta report.

KILLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_while_writing.py")


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, tiny):
  """A finished tiny main job, its command, and a `finish(workdir)` that runs the command."""
  root = tmp_path_factory.mktemp("main_job")
  overrides = tiny.pipeline_overrides(str(root / "tfds"))
  env = train_subprocess.cpu_env(device_count=2, compilation_cache=str(root / "jax_cache"))

  def command(workdir):
    return train_subprocess.train_command(workdir, overrides, config="configs/meta.py")

  def finish(workdir, name):
    train_subprocess.finish(train_subprocess.start(command(workdir), env, str(root / f"{name}.log")))
    with open(os.path.join(workdir, "meta", "metrics.json")) as f:
      return json.load(f)

  uninterrupted = str(root / "uninterrupted")
  return root, uninterrupted, finish(uninterrupted, "uninterrupted"), command, env, finish


@pytest.mark.parametrize("target, redo", [
    (os.path.join("mmshap", "mmshap_validation.npz"), ("mmshap", "meta")),
    (os.path.join("meta", "metrics.json"), ("meta",)),
])
def test_main_job_killed_while_writing_an_output_reruns_to_the_same_metrics(main_job, target, redo):
  root, uninterrupted, metrics, command, env, finish = main_job
  workdir = str(root / f"killed_{os.path.dirname(target)}")
  shutil.copytree(uninterrupted, workdir, ignore=lambda folder, names: (
      set(redo) & set(names) if folder == uninterrupted else ()))
  log = str(root / f"killed_{os.path.dirname(target)}.log")
  process = train_subprocess.start([sys.executable, KILLER, target, *command(workdir)[2:]], env, log)
  process.wait(timeout=train_subprocess.TIMEOUT_S)
  assert process.returncode == -signal.SIGKILL, open(log, errors="replace").read()[-3000:]
  final = os.path.join(workdir, target)
  partial = [name for name in os.listdir(os.path.dirname(final)) if ".partial-" in name]
  assert partial and not os.path.exists(final)  # Killed half way through that very file.
  assert finish(workdir, f"rerun_{os.path.dirname(target)}") == metrics
  assert not [name for name in os.listdir(os.path.dirname(final)) if ".partial-" in name]
