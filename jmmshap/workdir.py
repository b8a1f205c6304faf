"""The workdir layout: one folder per stage, the names of the files in it, and how they are written.

Every module asks here where a stage's files are; none spells another stage's file names.

  W/<stage>/
    config.json          the stage's config, as run
    class_names.json     label index -> class name (classifier stages)
    tokenizer.json       the title tokenizer the stage trained with (stages that read titles)
    log.jsonl            one record per log interval and per evaluation
    loss.png, accuracy.png   training curves
    events.out.tfevents.*    the same curves for TensorBoard (`tensorboard.py`; mmshap: histograms)
    checkpoints/         latest Orbax train states (resume)
    best/                the model selected on validation (eval, later stages)
    metrics.json         {"validation": {...}, "test": {...}} (meta: {"methods": {...}})
    logits_{split}.npz   logits, labels, ids, class_names (classifier stages)
    predictions_test.npz every method's test probabilities by id (meta)
    selection.json       predict's default method and its validation scores (meta)
    mmshap_{split}.npz   per-example MM-SHAP (the mmshap stage), summary.json
    export/              the vision tower as a Hugging Face folder (clip_pretrain; image: the
                         image learner's best model, for an MMBT on its tower)

The predictor's output folder (`predict.py --output=OUT`): predictions.csv, summary.json,
metrics.json (with labels), bad_rows.json, mmshap.npz, explanations.html, explanations/*.png.

A config may name an earlier stage's output before the workdir is chosen: `workdir:<stage>/<path>`
(e.g. the fashion MMBT's `init_from_image=workdir:clip_pretrain/export`, or `workdir:image/export`
with `model.image_tower=resnet`).

Files that later stages or a resumed run read back are written atomically (`write_atomically`):
a run killed mid-write leaves the old file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jmmshap import errors
from jmmshap.tokenizer import TOKENIZER_FILE

CONFIG = "config.json"
CLASS_NAMES = "class_names.json"
TOKENIZER = TOKENIZER_FILE
LOG = "log.jsonl"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
EXPORT = "export"
EXPORT_WEIGHTS = os.path.join(EXPORT, "model.safetensors")
SUMMARY = "summary.json"
FINGERPRINT = "fingerprint.json"
LOCK = ".lock"
TRAINING = "training.json"
REPORT = "report.md"
PREDICTIONS_TEST = "predictions_test.npz"  # The meta stage's test probabilities, per method.
SELECTION = "selection.json"  # The meta stage's choice of predict's default method ('auto').

# What the predictor (`jmmshap/predictor.py`, predict.py) writes into its output folder.
PREDICTIONS = "predictions.csv"
BAD_ROWS = "bad_rows.json"
EXPLANATIONS_HTML = "explanations.html"
EXPLANATION_PNGS = "explanations"  # One PNG per product.
SHAPLEY_VALUES = "mmshap.npz"  # Every explained product's Shapley values, as the mmshap stage's.

PREFIX = "workdir:"
# The settings that may hold a `workdir:` path: the checkpoints a stage starts from.
CHECKPOINT_KEYS = ("init_from", "init_from_text", "init_from_image")


def logits_file(split: str) -> str:
  return f"logits_{split}.npz"


def shares_file(split: str) -> str:
  return f"mmshap_{split}.npz"


def stage_dir(root: str, stage: str) -> str:
  return os.path.join(root, stage)


def path(root: str, stage: str, name: str) -> str:
  """The file `name` of a stage's folder."""
  return os.path.join(root, stage, name)


def resolve_paths(config: ml_collections.ConfigDict, root: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose `workdir:<path>` checkpoint settings point into `root`."""
  config = ml_collections.ConfigDict(config.to_dict())  # Locked configs stay untouched.
  for key in CHECKPOINT_KEYS:
    value = config.get(key)
    if isinstance(value, str) and value.startswith(PREFIX):
      config[key] = os.path.join(root, value[len(PREFIX):])
  return config


def stages_referenced(config: ml_collections.ConfigDict, root: str | None = None) -> set[str]:
  """The stages whose outputs a config's checkpoint settings name: `workdir:<stage>/...`, or (with
  `root`) a path already resolved into that workdir."""
  stages = set()
  for key in CHECKPOINT_KEYS:
    value = config.get(key)
    if not isinstance(value, str):
      continue
    if value.startswith(PREFIX):
      stages.add(value[len(PREFIX):].split("/")[0])
    elif root is not None and (inside := _path_inside(value, root)) is not None:
      stages.add(inside.split("/")[0])
  return stages


def _path_inside(value: str, root: str) -> str | None:
  """`value`'s path relative to the workdir `root` ('/'-separated), or None when it is elsewhere."""
  if not os.path.isabs(value):
    return None
  inside = os.path.relpath(value, os.path.abspath(root))
  return None if inside.startswith(os.pardir) else inside.replace(os.sep, "/")


def is_writer() -> bool:
  """Process 0 writes the files every process would write alike (logs, reports, outputs)."""
  return jax.process_index() == 0


def partial_path(target: str) -> str:
  """Where a file is written before its rename over `target` (it keeps the extension: np.savez
  insists on it)."""
  root, extension = os.path.splitext(target)
  return f"{root}.partial-{os.getpid()}{extension}"


def write_atomically(target: str, write: Callable[[str], Any]) -> None:
  """`write(partial)` then a rename over `target`: a run killed mid-write leaves the old file or
  none, and another process reading `target` meanwhile sees one whole version."""
  partial = partial_path(target)
  write(partial)
  os.replace(partial, target)


def write_folder_atomically(target: str, write: Callable[[str], Any]) -> None:
  """`write(partial_folder)`, then the folder replaces `target`: a run killed mid-write leaves
  the old folder, or none (between the two renames), never a half-written one under its name."""
  partial = f"{target}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  write(partial)
  shutil.rmtree(target, ignore_errors=True)
  os.replace(partial, target)


def write_text(target: str, text: str) -> None:
  def write(partial):
    with open(partial, "w") as f:
      f.write(text)
  write_atomically(target, write)


def write_bytes(target: str, data: bytes) -> None:
  def write(partial):
    with open(partial, "wb") as f:
      f.write(data)
  write_atomically(target, write)


def write_json(target: str, value: Any) -> None:
  write_text(target, json.dumps(value, indent=2))


def read_json(source: str) -> Any:
  with open(source) as f:
    return json.load(f)


def remove(*paths: str) -> None:
  """Deletes files or folders once (process 0), and every process waits until they are gone."""
  if is_writer():
    for target in paths:
      if os.path.isdir(target):
        shutil.rmtree(target)
      elif os.path.exists(target):
        os.remove(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jmmshap.workdir: removed {paths}")


def missing(root: str, stage: str, names: Iterable[str]) -> list[str]:
  """Those of a stage's files that do not exist yet."""
  return [target for target in (path(root, stage, name) for name in names)
          if not os.path.isfile(target)]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(root: str, stage: str,
                       requested: ml_collections.ConfigDict) -> list[str]:
  """Settings in which a stage's saved config.json differs from the one requested now."""
  saved_path = path(root, stage, CONFIG)
  if not os.path.isfile(saved_path):
    return []
  saved = flatten(read_json(saved_path))
  wanted = flatten(json.loads(resolve_paths(requested, root).to_json()))
  return [f"{key}: {saved[key]!r} there, {wanted[key]!r} now"
          for key in sorted(set(saved) & set(wanted)) if key != "mode" and saved[key] != wanted[key]]


class StageNotTrained(FileNotFoundError, errors.UserError):
  """A stage that a run reads, or evaluates, was not trained into the workdir (yet)."""


def read_config(root: str, stage: str) -> ml_collections.ConfigDict:
  """A stage's saved config.json; a clear error naming what to run when there is none."""
  saved_path = path(root, stage, CONFIG)
  if not os.path.isfile(saved_path):
    raise StageNotTrained(f"{saved_path} not found: train the {stage} stage into {root} first "
                          f"(python train.py --config=configs/{stage}.py --workdir={root}).")
  return ml_collections.ConfigDict(read_json(saved_path))


# ---------------------------------------------------------------------------------------------------
# Fingerprints: what a stage was built from.

# Settings that change neither what a stage learns nor what it writes: not part of its fingerprint
# (the data's location is not either; the dataset's identity is).
UNFINGERPRINTED = ("mode", "rerun", "output_dir", "log_every_steps", "keep_checkpoints",
                   "data.data_dir", "data.manual_dir", "data.worker_count", "data.prepare_workers")


class StaleStageError(ValueError, errors.UserError):
  """A stage folder built from other inputs than the ones a run is given now."""


def fingerprint(config: ml_collections.ConfigDict, root: str, *, data: str,
                class_names: Iterable[str], reads: Mapping[str, str | None]) -> dict[str, Any]:
  """What a stage is built from: its settings, the prepared dataset's identity (its builder's full
  name, which hashes the CSV and the images), the class names and the run of each stage it reads."""
  settings = flatten(json.loads(resolve_paths(config, root).to_json()))
  settings = _inside_as_workdir_paths(settings, root)
  return {"config": {key: value for key, value in settings.items() if key not in UNFINGERPRINTED},
          "data": data, "class_names": list(class_names), "reads": dict(sorted(reads.items()))}


def _inside_as_workdir_paths(settings: dict[str, Any], root: str) -> dict[str, Any]:
  """Resolved checkpoint settings that point into `root` written back as `workdir:<path>`: a
  fingerprint holds no location of its own workdir, so a copied or moved workdir keeps its stages
  (which run of a stage was read is pinned by `reads`)."""
  settings = dict(settings)
  for key in CHECKPOINT_KEYS:
    value = settings.get(key)
    if isinstance(value, str) and (inside := _path_inside(value, root)) is not None:
      settings[key] = PREFIX + inside
  return settings


def settings_differences(root: str, stage: str, config: ml_collections.ConfigDict) -> list[str]:
  """Settings in which the config a stage's folder was built with (its fingerprint) differs from
  `config`; none when the folder has no fingerprint."""
  saved = read_fingerprint(root, stage)
  if saved is None:
    return []
  current = fingerprint(config, root, data="", class_names=(), reads={})["config"]
  return [f"{key}: {saved['config'][key]!r} there, {current[key]!r} in the config"
          for key in sorted(set(saved["config"]) & set(current))
          if saved["config"][key] != current[key]]


def read_fingerprint(root: str, stage: str) -> dict[str, Any] | None:
  """The saved fingerprint; paths into `root` that older versions saved absolute read as
  `workdir:` paths, as `fingerprint` writes them now."""
  target = path(root, stage, FINGERPRINT)
  if not os.path.isfile(target):
    return None
  saved = read_json(target)
  return {**saved, "config": _inside_as_workdir_paths(saved["config"], root)}


def run_of(root: str, stage: str) -> str | None:
  """The id of the run that built a stage (new each time it is built from scratch)."""
  saved = read_fingerprint(root, stage)
  return None if saved is None else saved.get("run")


def write_fingerprint(root: str, stage: str, current: Mapping[str, Any]) -> None:
  if is_writer():
    os.makedirs(stage_dir(root, stage), exist_ok=True)
    write_json(path(root, stage, FINGERPRINT), {**current, "run": uuid.uuid4().hex})


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_differences(saved: Mapping[str, Any],
                            current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(differences in the stage's own inputs: settings, data, classes; stages it read that were
  built again since). Settings only one side has (a newer version's fields) are not differences."""
  inputs = [f"{key}: {saved['config'][key]!r} there, {current['config'][key]!r} now"
            for key in sorted(set(saved["config"]) & set(current["config"]))
            if saved["config"][key] != current["config"][key]]
  if saved["data"] != current["data"]:
    inputs.append(f"dataset: {saved['data']} there, {current['data']} now")
  if saved["class_names"] != current["class_names"]:
    inputs.append(f"class names: {_short(saved['class_names'])} there, "
                  f"{_short(current['class_names'])} now")
  reads = [f"{stage} was built again since" for stage in sorted(current["reads"])
           if saved["reads"].get(stage) != current["reads"][stage]]
  return inputs, reads


def claim(root: str, stage: str, current: Mapping[str, Any], *, training: bool) -> None:
  """Checks a stage folder against the inputs a run is given now, before it resumes or evaluates
  anything there; a new folder (training) records them.

  A folder of an older version without a fingerprint is taken as it is, with a warning.
  """
  saved = read_fingerprint(root, stage)
  if saved is None:
    if os.path.isdir(path(root, stage, CHECKPOINTS)) or os.path.isdir(path(root, stage, BEST)):
      logging.warning("%s has no %s (made by an older version): its inputs cannot be checked.",
                      stage_dir(root, stage), FINGERPRINT)
    if training:
      write_fingerprint(root, stage, current)
    return
  inputs, reads = fingerprint_differences(saved, current)
  if inputs or reads:
    raise StaleStageError(
        f"{stage_dir(root, stage)} was built from other inputs than this run's "
        f"({'; '.join((inputs + reads)[:6])}{'; ...' if len(inputs + reads) > 6 else ''}): "
        f"{'train' if training else 'evaluating'} it here would mix them. Build it again with "
        f"--config.rerun={stage} in the main job (or delete {stage_dir(root, stage)}), or use "
        "another --workdir.")


# ---------------------------------------------------------------------------------------------------
# One writer per stage folder.


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirBusy(RuntimeError, errors.UserError):
  """Another job is writing into the stage folder a run wants to write into."""


class StageLock:
  """`directory/.lock` while a job writes into a stage folder: a second job refuses to start there.

  The lock holds the owner's pid and host; a lock whose process is gone (same host) is taken over.
  In a job of several processes, process 0 holds it for all of them and every process learns
  whether it got it, so that they all stop together.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.target = os.path.join(directory, LOCK)
    self.held = False

  def _try(self) -> str | None:
    """None once the lock is ours; else why not."""
    os.makedirs(self.directory, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
      try:
        with open(self.target, "x") as f:
          json.dump(owner, f)
        return None
      except FileExistsError:
        try:
          holder = read_json(self.target)
        except (OSError, ValueError):
          holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == owner["host"] and isinstance(pid, int) and not _alive(pid):
          logging.warning("%s: taking over the lock of process %d, which is gone.", self.directory,
                          pid)
          with contextlib.suppress(FileNotFoundError):
            os.remove(self.target)
          continue
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        return (f"another job (process {pid} on {host}, since {since}) is writing into "
                f"{self.directory}: wait for it or stop it, or run this one in another --workdir. "
                f"If that job is gone, delete {self.target}.")
    return f"{self.target} keeps changing hands; try again."

  def __enter__(self) -> "StageLock":
    problem = self._try() if is_writer() else None
    if problem is None and is_writer():
      # Temporary files of writers that died before their rename: this job is the only writer now.
      for name in os.listdir(self.directory):
        if ".partial-" in name:
          target = os.path.join(self.directory, name)
          if os.path.isdir(target):
            shutil.rmtree(target)
          else:
            os.remove(target)
    if jax.process_count() > 1:
      got = multihost_utils.broadcast_one_to_all(np.int32(problem is None))
      problem = problem or (None if int(got) else f"process 0 could not lock {self.directory}")
    if problem:
      raise WorkdirBusy(problem)
    self.held = is_writer()
    return self

  def __exit__(self, *exc_info) -> None:
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.target)
      self.held = False
