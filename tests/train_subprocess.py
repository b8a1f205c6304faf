"""train.py in subprocesses of its own, for what one test process cannot do: several JAX processes,
a run killed with SIGKILL, and how a command line ends on a user's mistake.

Shared by test_distributed.py, test_crash_resume.py, test_train.py and test_predict.py (not a test
module itself).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jmmshap import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")

def train_command(workdir: str, overrides: Mapping[str, Any], *flags: str,
                  config: str = "configs/text.py") -> list[str]:
  return [sys.executable, TRAIN, f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{key}={value}" for key, value in overrides.items()), *flags]


def cpu_env(device_count: int, compilation_cache: str | None = None) -> dict[str, str]:
  """This process's environment with `device_count` CPU devices and, optionally, a compilation cache
  shared by the runs of one test (identical programs then compile once)."""
  env = dict(os.environ)
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count} {xla_flags}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["TFDS_DISABLE_GCS"] = "1"
  if compilation_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


# Generous against a normal run of these tiny configs (20 to 60 s on a 2-core machine), and below
# Orbax's 300 s barrier timeout, so a hang is ours to report, with the logs.
TIMEOUT_S = 240

_started: list[subprocess.Popen] = []


# Run before train.py, in the child: ask Linux to SIGKILL it when the test process dies, however
# that dies, then exec the command (the request survives exec). A preexec_fn would do the same but
# makes subprocess fork the multithreaded test process.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit('the test process is gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def start(command: Sequence[str], env: Mapping[str, str], log_path: str) -> subprocess.Popen:
  """A training process writing its output to `log_path`, in a process group of its own so that
  `kill` ends it with anything it started, and killed with the test process if that dies first."""
  if sys.platform == "linux":
    command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
  with open(log_path, "wb") as log:
    process = subprocess.Popen(command, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
  process.log_path = log_path
  _started.append(process)
  return process


def kill(process: subprocess.Popen) -> None:
  """SIGKILL to the process's whole group, then reaped."""
  if process.poll() is None:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  process.wait()


def descendants(pid: int) -> list[int]:
  """Every process started, directly or not, by process `pid` (Linux's /proc)."""
  children = []
  for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        children.extend(int(child) for child in f.read().split())
    except OSError:
      continue
  return children + [grandchild for child in children for grandchild in descendants(child)]


def running(pid: int) -> bool:
  """Whether process `pid` still runs (a zombie waiting to be reaped does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def kill_all() -> None:
  """Every training process a test started and did not finish (conftest runs this after each test
  module, and a failing fixture's `finally` runs `finish_all`)."""
  while _started:
    kill(_started.pop())


def _log_tail(process: subprocess.Popen, size: int = 6000) -> str:
  with open(process.log_path, errors="replace") as f:
    return f.read()[-size:]


def finish_all(processes: Sequence[subprocess.Popen], timeout: float = TIMEOUT_S) -> None:
  """Waits for processes that work together; the first failure, or the timeout, kills the rest at
  once (they would wait at a barrier for their lost peer) and fails with every process's log."""
  deadline = time.monotonic() + timeout
  pending = list(processes)
  problem = None
  while pending and problem is None:
    for process in list(pending):
      if process.poll() is not None:
        pending.remove(process)
        if process.returncode != 0:
          problem = f"{' '.join(process.args)} exited with {process.returncode}"
    if pending and time.monotonic() > deadline:
      problem = f"{len(pending)} of {len(processes)} processes still running after {timeout:.0f} s"
    time.sleep(0.05)
  for process in processes:
    kill(process)
    if process in _started:
      _started.remove(process)
  if problem:
    logs = "\n".join(f"----- {p.log_path} (exit {p.returncode}):\n"
                     f"{_log_tail(p)}" for p in processes)
    raise AssertionError(f"{problem}\n{logs}")


def finish(process: subprocess.Popen, timeout: float = TIMEOUT_S) -> None:
  """Waits for one training process and fails with the end of its log unless it succeeded."""
  finish_all([process], timeout)


def run_script(script: str, *args: str,
               timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
  """`python <script> <args>` (a path from the repository root) run to its end on one CPU device,
  its stdout and stderr captured as text."""
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                        env=cpu_env(device_count=1), capture_output=True, text=True,
                        timeout=timeout, check=False)


def user_error(result: subprocess.CompletedProcess) -> str:
  """The message of a command that stopped on a user's mistake, which is what the user sees: exit
  status 2, no traceback, and `error: <message>` the last line of stderr and its only error line
  (log lines may come before it). Fails with the end of stderr otherwise."""
  lines = result.stderr.splitlines()
  assert (result.returncode == errors.EXIT_STATUS and "Traceback" not in result.stderr and lines
          and lines[-1].startswith("error: ")
          and sum(line.startswith("error: ") for line in lines) == 1), (
              f"{' '.join(result.args)} exited with {result.returncode}; stderr ends:\n"
              f"{result.stderr[-6000:]}")
  return lines[-1].removeprefix("error: ")


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def finished_steps(checkpoints: str) -> list[int]:
  """Steps Orbax has finalised in a checkpoints folder (in-progress saves end in .orbax-checkpoint-tmp)."""
  if not os.path.isdir(checkpoints):
    return []
  return sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())


def checkpoint_params(workdir: str, step: int) -> list[np.ndarray]:
  """The params of a text-stage checkpoint as host arrays, whatever process layout saved them."""
  path = os.path.join(workdir, "text", "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return jax.tree.leaves(checkpointer.restore(path, restore_args=as_numpy)["params"])
