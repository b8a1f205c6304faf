"""The workdir layout: one folder per stage, the names of the files in it, and how they are written.

Every module asks here where a stage's files are; none spells another stage's file names.

  W/<stage>/
    config.json          the stage's config, as run
    class_names.json     label index -> class name (classifier stages)
    tokenizer.json       the title tokenizer the stage trained with (stages that read titles)
    log.jsonl            one record per log interval and per evaluation
    loss.png, accuracy.png   training curves
    checkpoints/         latest Orbax train states (resume)
    best/                the model selected on validation (eval, later stages)
    metrics.json         {"validation": {...}, "test": {...}} (meta: {"methods": {...}})
    logits_{split}.npz   logits, labels, ids, class_names (classifier stages)
    mmshap_{split}.npz   per-example MM-SHAP (the mmshap stage), summary.json
    export/              the pretrained vision tower as a Hugging Face folder (clip_pretrain)

A config may name an earlier stage's output before the workdir is chosen: `workdir:<stage>/<path>`
(e.g. the fashion MMBT's `init_from_image=workdir:clip_pretrain/export`).

Files that later stages or a resumed run read back are written atomically (`write_atomically`):
a run killed mid-write leaves the old file or none, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

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
TRAINING = "training.json"
REPORT = "report.md"

PREFIX = "workdir:"
# The settings that may hold a `workdir:` path: the checkpoints a stage starts from.
CHECKPOINT_KEYS = ("init_from", "init_from_text", "init_from_image")


def logits_file(split: str) -> str:
  return f"logits_{split}.npz"


def shares_file(split: str) -> str:
  return f"mmshap_{split}.npz"


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def path(workdir: str, stage: str, name: str) -> str:
  """The file `name` of a stage's folder."""
  return os.path.join(workdir, stage, name)


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose `workdir:<path>` checkpoint settings point into `workdir`."""
  config = ml_collections.ConfigDict(config.to_dict())  # Locked configs stay untouched.
  for key in CHECKPOINT_KEYS:
    value = config.get(key)
    if isinstance(value, str) and value.startswith(PREFIX):
      config[key] = os.path.join(workdir, value[len(PREFIX):])
  return config


def stages_referenced(config: ml_collections.ConfigDict) -> set[str]:
  """The stages whose outputs a config's `workdir:<stage>/...` settings name."""
  return {value[len(PREFIX):].split("/")[0] for key in CHECKPOINT_KEYS
          if isinstance(value := config.get(key), str) and value.startswith(PREFIX)}


def is_writer() -> bool:
  """Process 0 writes the files every process would write alike (logs, reports, outputs)."""
  return jax.process_index() == 0


def write_atomically(target: str, write: Callable[[str], Any]) -> None:
  """`write(partial)` then a rename over `target`: a run killed mid-write leaves the old file or
  none, and another process reading `target` meanwhile sees one whole version."""
  root, extension = os.path.splitext(target)
  partial = f"{root}.partial-{os.getpid()}{extension}"  # np.savez insists on its extension.
  write(partial)
  os.replace(partial, target)


def write_text(target: str, text: str) -> None:
  def write(partial):
    with open(partial, "w") as f:
      f.write(text)
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


def missing(workdir: str, stage: str, names: Iterable[str]) -> list[str]:
  """Those of a stage's files that do not exist yet."""
  return [target for target in (path(workdir, stage, name) for name in names)
          if not os.path.isfile(target)]


def finished_at(workdir: str, stage: str, names: Iterable[str]) -> float | None:
  """When the last of a stage's final files was written; None while any is missing."""
  targets = [path(workdir, stage, name) for name in names]
  if not all(os.path.isfile(target) for target in targets):
    return None
  return max(os.path.getmtime(target) for target in targets)


def written_at(workdir: str, stage: str, names: Iterable[str]) -> float:
  """When the first of a stage's (existing) final files was written."""
  return min(os.path.getmtime(path(workdir, stage, name)) for name in names)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(workdir: str, stage: str,
                       requested: ml_collections.ConfigDict) -> list[str]:
  """Settings in which a stage's saved config.json differs from the one requested now."""
  saved_path = path(workdir, stage, CONFIG)
  if not os.path.isfile(saved_path):
    return []
  saved = flatten(read_json(saved_path))
  wanted = flatten(json.loads(resolve_paths(requested, workdir).to_json()))
  return [f"{key}: {saved[key]!r} there, {wanted[key]!r} now"
          for key in sorted(set(saved) & set(wanted)) if key != "mode" and saved[key] != wanted[key]]


def read_config(workdir: str, stage: str) -> ml_collections.ConfigDict:
  """A stage's saved config.json; a clear error naming what to run when there is none."""
  saved_path = path(workdir, stage, CONFIG)
  if not os.path.isfile(saved_path):
    raise FileNotFoundError(f"{saved_path} not found: train the {stage} stage into {workdir} first "
                            f"(python train.py --config=configs/{stage}.py --workdir={workdir}).")
  return ml_collections.ConfigDict(read_json(saved_path))
