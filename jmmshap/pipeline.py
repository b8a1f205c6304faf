"""The pipeline: which stages there are, in what order, what each reads and writes, and the main job.

`STAGES` is the one list of stages. A stage is a module with `run(config, workdir)` and
`check_config(...)`, one entry here and one config file, `configs/<name>.py`. `run(config, workdir)`
is what `train.py` calls: it checks the whole config first (every problem listed at once), then runs
the config's stage; for the main job (`meta`) it first runs the upstream stages that are missing.

Reuse. A finished upstream stage (every file of its `writes` present) is reused when its saved
config.json matches the requested one and nothing it reads is newer than it; a stage whose saved
config differs is an error that names the settings (rerun it or use another workdir), and one named
in `--config.rerun` is deleted and run again. Stages never call back into this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from jmmshap import classifier, clip_pretrain, config_checks, ensemble, mmshap_stage, workdir
from jmmshap.builders import EVAL_SPLITS

# check(config, prefix, devices, the main job's `stages` or None) -> problems.
Check = Callable[[ml_collections.ConfigDict, str, int, ml_collections.ConfigDict | None], list[str]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the pipeline, as the main job sees it."""
  name: str
  run: Callable[[ml_collections.ConfigDict, str], Any]
  check: Check
  reads: tuple[str, ...] = ()  # Stages whose outputs it reads (those the main job has).
  writes: tuple[str, ...] = ()  # Files of its folder that mark it finished.
  optional: bool = False  # In the main job only when another stage's `workdir:` path names it.


def _classifier(stage: classifier.ClassifierStage, reads: tuple[str, ...] = ()) -> Stage:
  return Stage(
      stage.name, functools.partial(classifier.run, stage=stage),
      lambda config, prefix, devices, siblings: classifier.check_config(config, prefix),
      reads=reads,
      writes=(workdir.METRICS, *(workdir.logits_file(split) for split in EVAL_SPLITS)))


def _mmshap_check(config, prefix, devices, siblings) -> list[str]:
  mmbt = siblings.get("mmbt") if siblings is not None else None
  return mmshap_stage.check_config(config, prefix, devices,
                                   mmbt.model.num_image_embeddings if mmbt is not None else None)


STAGES: tuple[Stage, ...] = (
    _classifier(classifier.TEXT),
    _classifier(classifier.IMAGE),
    Stage(clip_pretrain.STAGE, clip_pretrain.run,
          lambda config, prefix, devices, siblings: clip_pretrain.check_config(config, prefix),
          writes=(workdir.METRICS, workdir.EXPORT_WEIGHTS), optional=True),
    _classifier(classifier.MMBT, reads=(clip_pretrain.STAGE,)),
    Stage(mmshap_stage.STAGE, mmshap_stage.run, _mmshap_check, reads=(classifier.MMBT.name,),
          writes=tuple(workdir.shares_file(split) for split in EVAL_SPLITS)),
    Stage(ensemble.STAGE, ensemble.run,
          lambda config, prefix, devices, siblings: ensemble.check_config(config, prefix),
          reads=(*(learner.name for learner in classifier.CLASSIFIERS.values()), mmshap_stage.STAGE),
          writes=(workdir.METRICS,)),
)
REGISTRY = {stage.name: stage for stage in STAGES}
MAIN_JOB = ensemble.STAGE
UPSTREAM = tuple(stage.name for stage in STAGES if stage.name != MAIN_JOB)


# ---------------------------------------------------------------------------------------------------
# Config checks.


def parse_rerun(value: str) -> set[str]:
  names = {name.strip() for name in value.split(",") if name.strip()}
  unknown = sorted(names - set(UPSTREAM))
  if unknown:
    raise ValueError(f"rerun={value!r}: unknown stage(s) {', '.join(unknown)}; use a comma-separated "
                     f"subset of {', '.join(UPSTREAM)}.")
  return names


def _check(problems: list[str], config: ml_collections.ConfigDict, prefix: str, devices: int,
           siblings: ml_collections.ConfigDict | None) -> None:
  name = config.get("stage")
  if name not in REGISTRY:
    problems.append(f"{prefix}stage={name!r}: known stages are {', '.join(REGISTRY)}.")
    return
  config_checks.check_run_settings(problems, config, prefix, devices)
  problems.extend(REGISTRY[name].check(config, prefix, devices, siblings))
  if name == MAIN_JOB:
    try:
      parse_rerun(config.rerun)
    except ValueError as error:
      problems.append(str(error))
    for stage_name, stage_config in config.stages.items():
      _check(problems, stage_config, f"stages.{stage_name}.", devices, config.stages)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every impossible setting of a config (nested stages included)."""
  problems: list[str] = []
  _check(problems, config, "", num_devices or jax.device_count(), None)
  config_checks.raise_if_any(config.get("stage"), problems)


# ---------------------------------------------------------------------------------------------------
# Running.


def main_job_stages(variant_configs: dict[str, ml_collections.ConfigDict]) -> list[str]:
  """The upstream stages of a main job, in order, from every stage's config for its variant:
  the optional ones only when another stage's `workdir:` path reads them."""
  referenced = set().union(*(workdir.stages_referenced(c) for c in variant_configs.values()))
  return [name for name in UPSTREAM
          if name in variant_configs and (not REGISTRY[name].optional or name in referenced)]


def _stale_reads(root: str, stage: Stage, stages: ml_collections.ConfigDict,
                 ran: list[str]) -> list[str]:
  """The stages this finished stage reads that ran in this job or finished after it."""
  written = workdir.written_at(root, stage.name, stage.writes)
  stale = []
  for name in stage.reads:
    if name not in stages:
      continue
    finished = workdir.finished_at(root, name, REGISTRY[name].writes)
    if name in ran or (finished is not None and finished > written):
      stale.append(name)
  return stale


def run_upstream(config: ml_collections.ConfigDict, root: str) -> list[str]:
  """Runs the main job's upstream stages whose outputs are missing, stale or asked for again, in
  `STAGES` order; returns those it ran."""
  rerun = parse_rerun(config.rerun)
  ran: list[str] = []
  for stage in STAGES:
    if stage.name == MAIN_JOB or stage.name not in config.stages:
      continue
    stage_config = config.stages[stage.name]
    directory = workdir.stage_dir(root, stage.name)
    if stage.name in rerun and os.path.isdir(directory):
      logging.info("pipeline: --config.rerun names %s: deleting %s and running it again",
                   stage.name, directory)
      workdir.remove(directory)
    differences = workdir.config_differences(root, stage.name, stage_config)
    if differences:
      raise ValueError(
          f"{directory} was trained with other settings than config.stages.{stage.name} asks for "
          f"({'; '.join(differences[:5])}{'; ...' if len(differences) > 5 else ''}): add "
          f"{stage.name} to --config.rerun to train it again, or use another --workdir.")
    done = workdir.finished_at(root, stage.name, stage.writes) is not None
    if done and (stale := _stale_reads(root, stage, config.stages, ran)):
      logging.info("pipeline: %s read an older %s; running it again", directory, ", ".join(stale))
      done = False
    if done:
      logging.info("pipeline: reusing the finished %s stage in %s", stage.name, directory)
      continue
    logging.info("pipeline: running the %s stage into %s", stage.name, directory)
    run(stage_config, root)
    ran.append(stage.name)
  return ran


def run(config: ml_collections.ConfigDict, root: str) -> Any:
  """Checks the config (every problem at once, before any work), then runs its stage; the main job
  first runs the upstream stages it needs."""
  validate(config)
  stage = REGISTRY[config.stage]
  if stage.name == MAIN_JOB and config.mode == "train":
    run_upstream(config, root)
  return stage.run(workdir.resolve_paths(config, root), root)
