r"""Runs the multi-process and crash-resume tests many times in a row and records every run.

A race between processes shows up in some runs only; one green run says little. This runs the
two test files serially, `--runs` times, each in a fresh pytest process (as CI would), and writes
each run's exit code, wall time and pytest summary line to a JSON file.

  python scripts/stress_multiprocess.py --runs=20 --output=docs/benchmarks/stress_multiprocess.json

Not part of the test suite: 20 runs take about 15 minutes on a 2-core machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ("tests/test_distributed.py", "tests/test_crash_resume.py")

_RUNS = flags.DEFINE_integer("runs", 20, "How many serial runs.")
_OUTPUT = flags.DEFINE_string("output", "stress_multiprocess.json", "Where the JSON record goes.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds before one run counts as hung.")


def run_once(timeout: float) -> dict:
  """One pytest process over TESTS: its exit code, wall time and summary line."""
  start = time.perf_counter()
  try:
    completed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                *TESTS], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               check=False)
    code, output = completed.returncode, completed.stdout + completed.stderr
  except subprocess.TimeoutExpired as error:
    code, output = None, f"timed out after {timeout} s\n{error.stdout or ''}"
  lines = [line for line in output.splitlines() if line.strip()]
  return {"exit_code": code, "wall_s": round(time.perf_counter() - start, 1),
          "summary": lines[-1] if lines else "",
          "output_tail": output[-3000:] if code != 0 else ""}


def main(argv) -> None:
  del argv
  runs = []
  for index in range(_RUNS.value):
    runs.append(run_once(_TIMEOUT.value))
    print(f"run {index + 1}/{_RUNS.value}: exit {runs[-1]['exit_code']}, {runs[-1]['wall_s']} s, "
          f"{runs[-1]['summary']}", flush=True)
  passed = sum(run["exit_code"] == 0 for run in runs)
  walls = [run["wall_s"] for run in runs]
  record = {"tests": list(TESTS), "runs": len(runs), "passed": passed,
            "wall_s": {"min": min(walls), "median": sorted(walls)[len(walls) // 2],
                       "max": max(walls)},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(),
                        **{name: importlib.metadata.version(name)
                           for name in ("jax", "jaxlib", "orbax-checkpoint")}},
            "per_run": runs}
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=2)
  print(f"{passed} of {len(runs)} runs passed; wall time {record['wall_s']}")
  sys.exit(0 if passed == len(runs) else 1)


if __name__ == "__main__":
  app.run(main)
