r"""What a catalogue's size costs: dataset preparation, and the main job's rerun on an unchanged one.

  PYTHONPATH=. python scripts/bench_scale.py --out=docs/benchmarks/scale.json
  PYTHONPATH=. python scripts/bench_scale.py --out=/tmp/prep.json --sizes=20000,200000 --skip_main_job

For each size N (`--sizes`), a product folder of N products (scripts/make_catalogue.py, the fashion
photos hard-linked under new ids; `--source=toyshop` without the fashion data) under `--scratch`, then:

- preparation: a fresh process calls `builders.prepare(data_config)` into a fresh data_dir (the
  `taimd17k` product_folder config on the folder); its wall time (`prep_s`, imports excluded), its
  peak RSS (`ru_maxrss`, and the peak of any worker processes of its own), and the time of a second
  `prepare` on the prepared data (`prepare_again_s`: what every stage pays to find it prepared);
- the main job (`train.py --config=configs/meta.py:taimd17k`, every model tiny and 2 steps, MM-SHAP
  on `--mmshap_examples` examples per split, meta-MLPs of 20 steps) run once to finish every stage
  (`first_run_s`), then again on the unchanged folder: `rerun_s`, and `rerun_overhead_s`, its
  difference to the same rerun on a `--tiny_size` catalogue; then once more after one photo was
  replaced by another valid JPEG (`rerun_after_one_photo_s`, with the exit code, the stages the
  log says ran or were reused, and its last error line). The log's pipeline lines, with their
  seconds since the process started, are kept per run (`log`).

`--prepare_workers=K` sets `data.prepare_workers` of the preparation rows (the 0/1/2-worker
comparison in docs/BENCHMARKS.md). Main-job rows are measured for the sizes in `--main_job_sizes` (default: all of `--sizes`), none
with `--skip_main_job`. Every row records the 1-minute load average before and after it (the machine
is shared). `--profile_prepare=FILE` adds a preparation of the first size under cProfile (a pstats
file, and the 30 functions of most cumulative time in the row's `prep_profile`).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import re
import resource
import shutil
import subprocess
import sys
import time

import jax
from PIL import Image, ImageOps

from configs import common
from jmmshap import builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_CATALOGUE = os.path.join(REPO, "scripts", "make_catalogue.py")
TRAIN = os.path.join(REPO, "train.py")

# Every stage of the main job tiny, 2 training steps; evaluation still covers validation and test.
_RUN = {"batch_size": 16, "eval_batch_size": 256, "total_steps": 2, "log_every_steps": 1}
_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "patch_size": 16}
_TEXT_DATA = {"data.max_length": 10, "data.vocab_size": 200}
TINY_STAGES = {
    "text": {**_RUN, **_TEXT_DATA, **{f"model.{k}": v for k, v in _BERT.items()}},
    "image": {**_RUN, "data.image_size": 32, "model.depth": 18, "model.width": 4,
              "model.small_stem": True},
    "mmbt": {**_RUN, **_TEXT_DATA, "data.image_size": 32,
             **{f"model.bert.{k}": v for k, v in _BERT.items()},
             **{f"model.clip.{k}": v for k, v in _CLIP.items()}},
    "mmshap": {"max_text_players": 2, "examples_per_group": 8},
}
TINY_META = {"hidden_size": 16, "num_steps": 20, "eval_every_steps": 10, "checkpoint_every_steps": 20,
             "weighting": "none,dataset"}  # 'sample' needs MM-SHAP on every example.
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ (\S+):\d+\] (.*)$")
# Log lines kept per run: the pipeline's decisions and the meta stage's own lines.
_KEPT_SOURCES = ("pipeline.py", "ensemble.py", "meta.py")
_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception)\b")
_STAGE_LINE = re.compile(r"pipeline: (running|reusing the finished) (\w+) stage")


def load_average() -> float:
  return os.getloadavg()[0]


def data_config(catalogue: str, data_dir: str, prepare_workers: int | None = None):
  """The product_folder data config of a make_catalogue.py folder (configs/common.py's taimd17k)."""
  config = common.data_config("taimd17k")
  config.manual_dir = catalogue
  config.data_dir = data_dir
  config.image_column = "image"
  if prepare_workers is not None and "prepare_workers" in config:  # (Older code has no such key.)
    config.prepare_workers = prepare_workers
  return config


def peak_rss_mb() -> dict[str, float]:
  """This process's peak RSS, and the largest of its finished children's (worker processes)."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"self": round(own, 1), "children": round(children, 1)}


def profile_summary(stats: pstats.Stats, count: int = 30) -> list[list]:
  """The `count` functions of most cumulative time: [function, calls, own seconds, cumulative seconds]."""
  rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])[:count]
  return [[f"{os.path.basename(file)}:{line}({name})", calls, round(own, 3), round(cumulative, 3)]
          for (file, line, name), (_, calls, own, cumulative, _) in rows]


def child_prepare(catalogue: str, data_dir: str, profile: str | None,
                  prepare_workers: int | None) -> None:
  """In a fresh process: prepare the folder's dataset, then find it prepared again; prints JSON."""
  config = data_config(catalogue, data_dir, prepare_workers)
  profiler = cProfile.Profile() if profile else None
  start = time.perf_counter()
  if profiler:
    profiler.enable()
  builder = builders.prepare(config)
  if profiler:
    profiler.disable()
    profiler.dump_stats(profile)
  prep_s = time.perf_counter() - start
  hottest = profile_summary(pstats.Stats(profiler)) if profiler else None
  rss = peak_rss_mb()
  start = time.perf_counter()
  builders.prepare(config)
  prepare_again_s = time.perf_counter() - start
  report = builders.read_report(builder) or {}
  print(json.dumps({"prep_s": prep_s, "prep_peak_rss_mb": rss["self"],
                    "prep_children_peak_rss_mb": rss["children"],
                    "prepare_again_s": prepare_again_s, "examples": report.get("examples"),
                    "dataset": builders.identity(builder), "profile_top": hottest}))


def run_child(args: list[str]) -> tuple[dict, float]:
  start = time.perf_counter()
  result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
  wall = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"preparation child failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1]), wall


def make_catalogue(out: str, products: int, source: str, fashion_dir: str) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, MAKE_CATALOGUE, f"--products={products}", f"--out={out}",
                  f"--source={source}", f"--fashion_dir={fashion_dir}"], check=True, cwd=REPO)
  return time.perf_counter() - start


def main_job_flags(catalogue: str, data_dir: str, job: str, mmshap_examples: int) -> list[str]:
  flags = [f"--config={os.path.join(REPO, 'configs', 'meta.py')}:taimd17k", f"--workdir={job}",
           f"--config.data.manual_dir={catalogue}", f"--config.data.data_dir={data_dir}",
           "--config.data.image_column=image",
           f"--config.stages.mmshap.max_examples={mmshap_examples}"]
  for stage, overrides in TINY_STAGES.items():
    flags += [f"--config.stages.{stage}.{key}={value}" for key, value in overrides.items()]
  flags += [f"--config.meta.{key}={value}" for key, value in TINY_META.items()]
  return flags


def _seconds_of_day(hours: str, minutes: str, seconds: str) -> float:
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def run_main_job(flags: list[str], log_path: str) -> dict:
  """One train.py run: wall time, exit code, and its pipeline log lines in seconds since its start."""
  started = datetime.datetime.now()
  start = time.perf_counter()
  with open(log_path, "w") as log:
    returncode = subprocess.run([sys.executable, TRAIN, *flags], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO).returncode
  wall = time.perf_counter() - start
  origin = started.hour * 3600 + started.minute * 60 + started.second + started.microsecond / 1e6
  events, ran, reused, last_error = [], [], [], None
  with open(log_path, errors="replace") as log:
    for line in log:
      match = _ABSL_LINE.match(line)
      if match and match.group(4) in _KEPT_SOURCES:
        message = match.group(5)
        offset = (_seconds_of_day(*match.group(1, 2, 3)) - origin) % 86400
        events.append([round(offset, 2), f"{match.group(4)}: {message[:160]}"])
        stage = _STAGE_LINE.search(message)
        if stage:
          (ran if stage.group(1) == "running" else reused).append(stage.group(2))
      if _ERROR_LINE.match(line):
        last_error = line.strip()[:600]
  return {"seconds": round(wall, 2), "returncode": returncode, "ran": ran, "reused": reused,
          "error": last_error, "log": events, "log_file": log_path}


def replace_one_photo(catalogue: str) -> str:
  """Replaces the first product's photo by its mirror image, a new file (the old one may be a hard
  link to the source catalogue's photo, which must not change)."""
  with open(os.path.join(catalogue, "products.csv"), encoding="utf-8") as f:
    f.readline()
    image = f.readline().rstrip("\n").split(",")[-1]
  path = os.path.join(catalogue, "images", image)
  with Image.open(path) as photo:
    mirrored = ImageOps.mirror(photo.convert("RGB"))
  replacement = path + ".new"
  mirrored.save(replacement, format="JPEG", quality=90)
  os.replace(replacement, path)
  return path


def main_job_row(catalogue: str, scratch: str, mmshap_examples: int) -> dict:
  data_dir, job = os.path.join(scratch, "main_tfds"), os.path.join(scratch, "job")
  flags = main_job_flags(catalogue, data_dir, job, mmshap_examples)
  first = run_main_job(flags, os.path.join(scratch, "run1.log"))
  if first["returncode"] != 0:
    raise RuntimeError(f"the first main job failed; see {first['log_file']}: {first['error']}")
  rerun = run_main_job(flags, os.path.join(scratch, "run2.log"))
  changed = replace_one_photo(catalogue)
  after_photo = run_main_job(flags, os.path.join(scratch, "run3.log"))
  return {"first_run_s": first["seconds"], "rerun_s": rerun["seconds"],
          "rerun_after_one_photo_s": after_photo["seconds"], "changed_photo": changed,
          "runs": {"first": first, "rerun": rerun, "after_one_photo": after_photo}}


_CODE = ("jmmshap", "configs", "train.py")  # What the measurements measure.


def git(*args: str) -> str:
  return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()


def code_commit() -> str:
  """The last commit that changed the measured code, marked when the worktree changes it further."""
  dirty = git("status", "--porcelain", "--", *_CODE)
  return git("log", "-1", "--format=%H", "--", *_CODE) + ("+uncommitted changes" if dirty else "")


def machine() -> dict:
  return {"cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "platform": platform.platform(), "commit": git("rev-parse", "HEAD"),
          "code_commit": code_commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure_size(size: int, args, main_job: bool, profile: str | None) -> dict:
  scratch = os.path.join(args.scratch, f"n{size}")
  shutil.rmtree(scratch, ignore_errors=True)
  catalogue = os.path.join(scratch, "catalogue")
  row = {"N": size, "load_before": load_average()}
  row["make_catalogue_s"] = round(make_catalogue(catalogue, size, args.source, args.fashion_dir), 2)
  workers = [] if args.prepare_workers is None else [f"--prepare_workers={args.prepare_workers}"]
  row["prepare_workers"] = args.prepare_workers
  prep, wall = run_child(["--child_prepare", catalogue, "--child_data_dir",
                          os.path.join(scratch, "prep_tfds"), *workers])
  row.update({key: (round(value, 3) if isinstance(value, float) else value)
              for key, value in prep.items() if key != "profile_top"})
  row["prep_process_s"] = round(wall, 2)
  if profile:  # Another fresh preparation, under cProfile (slower than the timed one).
    profiled, _ = run_child(["--child_prepare", catalogue, "--child_data_dir",
                             os.path.join(scratch, "profiled_tfds"), "--child_profile", profile])
    row["prep_profile"] = {"file": profile, "prep_s_profiled": round(profiled["prep_s"], 3),
                           "top_cumulative": profiled["profile_top"]}
  if main_job:
    job = main_job_row(catalogue, scratch, args.mmshap_examples)
    row.update({key: job.pop(key) for key in ("first_run_s", "rerun_s", "rerun_after_one_photo_s")})
    row.update(job)
  row["load_after"] = load_average()
  if not args.keep:
    shutil.rmtree(scratch, ignore_errors=True)
  return row


def parse_sizes(text: str) -> list[int]:
  try:
    sizes = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated product counts") from None
  if not sizes or min(sizes) < 10:
    raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 10 products")
  return sizes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="The JSON to write (rows are added as they finish).")
  parser.add_argument("--sizes", type=parse_sizes, default=[20_000, 100_000, 200_000])
  parser.add_argument("--main_job_sizes", type=parse_sizes, default=None,
                      help="Sizes that also get the main-job rows (default: all of --sizes).")
  parser.add_argument("--skip_main_job", action="store_true", help="Preparation rows only.")
  parser.add_argument("--prepare_workers", type=int, default=None,
                      help="data.prepare_workers of the preparation rows (default: the code's).")
  parser.add_argument("--tiny_size", type=int, default=1000,
                      help="The catalogue the reruns' overhead is measured against.")
  parser.add_argument("--mmshap_examples", type=int, default=16, help="MM-SHAP examples per split.")
  parser.add_argument("--source", default="fashion", choices=("fashion", "toyshop"))
  parser.add_argument("--fashion_dir", default="/work/shared/data/fashion-products"
                      if os.path.isdir("/work/shared/data/fashion-products")
                      else "../shared/data/fashion-products")
  parser.add_argument("--scratch", default="/tmp/jmmshap_bench_scale",
                      help="Catalogues, prepared data and workdirs (deleted per size unless --keep).")
  parser.add_argument("--keep", action="store_true", help="Keep each size's scratch folder.")
  parser.add_argument("--profile_prepare", help="Also prepare the first size under cProfile, into this "
                      "pstats file.")
  parser.add_argument("--child_prepare", help=argparse.SUPPRESS)
  parser.add_argument("--child_data_dir", help=argparse.SUPPRESS)
  parser.add_argument("--child_profile", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_prepare:
    child_prepare(args.child_prepare, args.child_data_dir, args.child_profile, args.prepare_workers)
    return
  if not args.out:
    parser.error("--out is required")
  main_sizes = [] if args.skip_main_job else (args.main_job_sizes or args.sizes)
  if set(main_sizes) - set(args.sizes):
    parser.error(f"--main_job_sizes={main_sizes} names sizes that are not in --sizes={args.sizes}")
  result = {"machine": machine(), "source": args.source, "sizes": args.sizes,
            "main_job_sizes": main_sizes, "tiny_size": args.tiny_size,
            "main_job_overrides": {"stages": TINY_STAGES, "meta": TINY_META,
                                   "mmshap_max_examples": args.mmshap_examples},
            "rows": [], "tiny": None}
  started = time.perf_counter()

  def save() -> None:
    result["total_s"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  if main_sizes:
    result["tiny"] = measure_size(args.tiny_size, args, True, None)
    save()
  for index, size in enumerate(args.sizes):
    row = measure_size(size, args, size in main_sizes, args.profile_prepare if index == 0 else None)
    if "rerun_s" in row:
      row["rerun_overhead_s"] = round(row["rerun_s"] - result["tiny"]["rerun_s"], 2)
    result["rows"].append(row)
    save()
    print(json.dumps({key: value for key, value in row.items() if key not in ("runs",)}), flush=True)
  save()


if __name__ == "__main__":
  main()
