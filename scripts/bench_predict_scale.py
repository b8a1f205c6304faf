r"""Peak memory and time of predict.py as the catalogue grows (issue #28: predict streams).

  PYTHONPATH=. python scripts/bench_predict_scale.py --workdir=W --products=10000,100000 \
      --data_dir=/tmp/catalogues --output=docs/benchmarks/predict_scale.json
  # The code before streaming, measured the same way:
  git worktree add /tmp/predict-base d34f07b
  PYTHONPATH=. python scripts/bench_predict_scale.py ... --repo=/tmp/predict-base --label=base

W is a finished toyshop workdir (the tests' tiny one keeps MM-SHAP cheap: 2 text players). For each
N, a folder of N new toyshop products with labels (W's classes drawn with another seed,
`toyshop.write_products`) is written once into --data_dir; then predict.py of --repo (this checkout
by default) runs on it in a child process per mode (`no_explain`, `explain`), and the child's peak
resident memory (its rusage from `os.wait4`: the largest RSS it reached, grain workers included
once reaped) and its wall time are recorded. The goal: peak RSS at 100k at most twice that at 10k.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from jmmshap import classifier, toyshop, workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished toyshop workdir.")
_PRODUCTS = flags.DEFINE_list("products", ["10000", "100000"], "Catalogue sizes.")
_MODES = flags.DEFINE_list("modes", ["no_explain", "explain"], "no_explain and/or explain.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the product folders are written (once).")
_REPO = flags.DEFINE_string("repo", None, "The checkout whose predict.py runs (default: this one).")
_LABEL = flags.DEFINE_string("label", "streaming", "The code measured, as named in the JSON.")
_FLAGS = flags.DEFINE_list("predict_flags", [], "More predict.py flags, e.g. --chunk_size=1024.")
_OUTPUT = flags.DEFINE_string("output", "predict_scale.json", "The JSON record; runs already "
                              "there for other labels, sizes or modes are kept.")
_SEED = 7  # The products' generator seed (W's data has seed 0).
flags.mark_flags_as_required(["workdir", "data_dir"])


def product_folder(count: int) -> str:
  """N labelled new products of W's classes, written once."""
  folder = os.path.join(_DATA_DIR.value, f"toyshop_{count}")
  if os.path.isfile(os.path.join(folder, toyshop.PRODUCTS_CSV)):
    return folder
  data = workdir.read_config(_WORKDIR.value, classifier.MMBT.name).data
  if data.name != "toyshop":
    raise app.UsageError(f"{_WORKDIR.value} was trained on {data.name!r} data, not toyshop.")
  spec = toyshop.ToyshopSpec(**data.toyshop.to_dict())
  per_class = -(-count // spec.num_classes)
  spec = dataclasses.replace(spec, seed=_SEED, test_per_class=per_class)
  partial = f"{folder}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  toyshop.write_products(partial, spec, "test", labels=True, limit=count, id_prefix=f"seed{_SEED}-")
  os.replace(partial, folder)
  return folder


def measure(repo: str, folder: str, explain: bool) -> dict:
  """predict.py in a child process: its peak RSS and wall time, and what its summary says."""
  with tempfile.TemporaryDirectory() as output:
    command = [sys.executable, os.path.join(repo, "predict.py"), f"--workdir={_WORKDIR.value}",
               f"--input={folder}", f"--output={output}", *_FLAGS.value]
    if not explain:
      command.append("--no_explain")
    env = {**os.environ, "PYTHONPATH": repo}
    started = time.perf_counter()
    with open(os.path.join(output, "log.txt"), "wb") as log:
      child = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
      _, status, usage = os.wait4(child.pid, 0)
    wall_s = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
      with open(os.path.join(output, "log.txt"), errors="replace") as f:
        raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}:\n"
                           f"{f.read()[-4000:]}")
    summary = workdir.read_json(os.path.join(output, workdir.SUMMARY))
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall_s,  # ru_maxrss: KiB (Linux).
            "user_s": usage.ru_utime, "system_s": usage.ru_stime,
            "products": summary["products"], "timings": summary["timings"],
            "command": " ".join(command[1:])}


def main(argv) -> None:
  del argv
  repo = os.path.abspath(_REPO.value or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  record = workdir.read_json(_OUTPUT.value) if os.path.isfile(_OUTPUT.value) else {"runs": {}}
  commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  record.update({"workdir": os.path.abspath(_WORKDIR.value), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "platform": platform.platform()})
  runs = record["runs"].setdefault(_LABEL.value, {"repo": repo, "commit": commit})
  runs.update({"repo": repo, "commit": commit, "predict_flags": _FLAGS.value})
  for count in (int(n) for n in _PRODUCTS.value):
    folder = product_folder(count)
    for mode in _MODES.value:
      load = os.getloadavg()
      result = measure(repo, folder, explain=mode == "explain")
      result["load_average_before"] = load
      runs.setdefault(mode, {})[str(count)] = result
      print(f"{_LABEL.value} {mode} {count}: peak RSS {result['peak_rss_mb']:.0f} MB, "
            f"{result['wall_s']:.1f} s", flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
      workdir.write_json(_OUTPUT.value, record)  # After each run: a long one is not lost.


if __name__ == "__main__":
  app.run(main)
