"""The pipeline: which stages there are, in what order, what each reads and writes, and the main job.

`STAGES` is the one list of stages. A stage is a module with `run(config, workdir)` and
`check_config(...)`, one entry here and one config file, `configs/<name>.py`. `run(config, workdir)`
is what `train.py` calls: it checks the whole config, and every pretrained checkpoint its stages
will read (`pretrained.py`), first (every problem listed at once), then runs the config's stage;
for the main job (`meta`) it first runs the upstream stages that are missing.

Reuse. Every stage records what it was built from (`workdir.fingerprint`: its settings, the
prepared dataset's identity, the class names, the runs of the stages it read). A finished upstream
stage (every file of its `writes` present) is reused when that record matches what the main job
would build it from now; one whose settings, data or classes differ is an error that names them
(rerun it or use another workdir); one that read a stage built again since is run again; one named
in `--config.rerun` is deleted and run again. Each stage runs holding its folder's lock
(`workdir.StageLock`): a second job on the same stage refuses to start. Stages never call back into
this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from jmmshap import (builders, classifier, clip_pretrain, config_checks, ensemble, mmshap_stage,
                     pretrained, workdir)
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
  # (config, workdir) -> what the stage would be built from now; None: never reused.
  fingerprint: Callable[[ml_collections.ConfigDict, str], dict] | None = None
  # config -> the pretrained checkpoints it starts from (checked before any stage of a job runs).
  checkpoints: Callable[[ml_collections.ConfigDict], list[pretrained.Checkpoint]] = (
      lambda config: [])


def _classifier(stage: classifier.ClassifierStage, reads: tuple[str, ...] = (),
                writes: tuple[str, ...] = ()) -> Stage:
  return Stage(
      stage.name, functools.partial(classifier.run, stage=stage),
      lambda config, prefix, devices, siblings: classifier.check_config(config, prefix),
      reads=reads,
      writes=(workdir.METRICS, *(workdir.logits_file(split) for split in EVAL_SPLITS), *writes),
      fingerprint=classifier.fingerprint, checkpoints=classifier.pretrained_checkpoints)


def _mmshap_check(config, prefix, devices, siblings) -> list[str]:
  mmbt = siblings.get("mmbt") if siblings is not None else None
  return mmshap_stage.check_config(config, prefix, devices,
                                   mmbt.model.num_image_embeddings if mmbt is not None else None)


STAGES: tuple[Stage, ...] = (
    _classifier(classifier.TEXT),
    # Before the image learner and the MMBT, either of which may start from its tower.
    Stage(clip_pretrain.STAGE, clip_pretrain.run,
          lambda config, prefix, devices, siblings: clip_pretrain.check_config(config, prefix),
          writes=(workdir.METRICS, workdir.EXPORT_WEIGHTS), optional=True,
          fingerprint=classifier.fingerprint, checkpoints=clip_pretrain.pretrained_checkpoints),
    # Its export (a HF folder of its tower) is what an MMBT on the image learner's ResNet starts
    # from; a finished folder of an older version without one is evaluated again to write it.
    _classifier(classifier.IMAGE, reads=(clip_pretrain.STAGE,), writes=(workdir.EXPORT_WEIGHTS,)),
    _classifier(classifier.MMBT, reads=(clip_pretrain.STAGE, classifier.IMAGE.name)),
    Stage(mmshap_stage.STAGE, mmshap_stage.run, _mmshap_check, reads=(classifier.MMBT.name,),
          writes=tuple(workdir.shares_file(split) for split in EVAL_SPLITS),
          fingerprint=mmshap_stage.fingerprint),
    Stage(ensemble.STAGE, ensemble.run,
          lambda config, prefix, devices, siblings: ensemble.check_config(config, prefix),
          reads=(*(learner.name for learner in classifier.CLASSIFIERS.values()), mmshap_stage.STAGE),
          writes=(workdir.METRICS,)),
)
REGISTRY = {stage.name: stage for stage in STAGES}
MAIN_JOB = ensemble.STAGE
UPSTREAM = tuple(stage.name for stage in STAGES if stage.name != MAIN_JOB)
# The main job's top-level checkpoint settings (configs/meta.py): each is shared by the stage
# settings it names, (stage, setting, top-level field).
CHECKPOINT_FLAGS = (("text", "init_from", "text_checkpoint"),
                    ("mmbt", "init_from_text", "text_checkpoint"),
                    ("image", "init_from", "image_checkpoint"),
                    ("mmbt", "init_from_image", "clip_checkpoint"))


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


def _written_by(value: str, earlier: list[str]) -> str | None:
  """The earlier stage of the job whose outputs include the `workdir:` path `value`, or None."""
  stage, _, inside = value[len(workdir.PREFIX):].partition("/")
  inside = inside.strip("/")
  if stage not in earlier or not inside:
    return None
  written = (name.replace(os.sep, "/") for name in REGISTRY[stage].writes)
  return stage if any(name == inside or name.startswith(f"{inside}/") for name in written) else None


def checkpoint_problems(config: ml_collections.ConfigDict, root: str) -> list[str]:
  """Every pretrained checkpoint the config's stages will read (the main job's: all of its
  upstream stages, the reused ones included) that they could not use (`pretrained.problems`),
  named by their settings. A `workdir:` path that an earlier stage of the job writes is left to it,
  unless it is there already and that stage is not rerun; any other must exist."""
  name = config.get("stage")
  if name not in REGISTRY:
    return []
  rerun: set[str] = set()
  if name != MAIN_JOB:
    jobs = [(name, config, "")]
  elif config.get("mode") == "train":  # In eval the main job runs no upstream stage.
    try:
      rerun = parse_rerun(config.rerun)
    except ValueError:
      return []  # Reported by `_check`.
    jobs = [(stage, config.stages[stage], f"stages.{stage}.")
            for stage in main_job_stages(config.stages)]
  else:
    return []
  flags = ({f"stages.{stage}.{key}": field for stage, key, field in CHECKPOINT_FLAGS}
           if name == MAIN_JOB else {})
  # (flag, value, problem) -> the settings it was found in: a top-level flag's problem once.
  found: dict[tuple[str, Any, str], list[str]] = {}

  def report(setting: str, value: Any, problem: str) -> None:
    found.setdefault((flags.get(setting, setting), value, problem), []).append(setting)

  earlier: list[str] = []
  for stage, stage_config, prefix in jobs:
    resolved = workdir.resolve_paths(stage_config, root)
    skip = set()
    for key in workdir.CHECKPOINT_KEYS:
      value = stage_config.get(key)
      if not (isinstance(value, str) and value.startswith(workdir.PREFIX)):
        continue
      writer = _written_by(value, earlier)
      there = os.path.exists(resolved[key])
      if writer is not None and (writer in rerun or not there):
        skip.add(key)
      elif not there:
        skip.add(key)
        report(prefix + key, value, f"{resolved[key]} does not exist, and no earlier stage of this "
               "job writes it." if name == MAIN_JOB else f"{resolved[key]} does not exist: run "
               "the stage that writes it into this workdir first.")
    # A stage that has its own tokenizer saved reads no other (unless it is rerun from scratch).
    saved_tokenizer = (os.path.isfile(workdir.path(root, stage, workdir.TOKENIZER))
                       and stage not in rerun)
    for key, problem in pretrained.problems(resolved, REGISTRY[stage].checkpoints(resolved),
                                            skip=skip, tokenizers=not saved_tokenizer):
      report(prefix + key, pretrained.value(stage_config, key), problem)
    earlier.append(stage)
  lines = []
  for (flag, value, problem), settings in found.items():
    named = flag if settings == [flag] else f"{flag} ({', '.join(settings)})"
    lines.append(f"{named}={value!r}: {problem}")
  return lines


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             root: str | None = None) -> None:
  """Raises ConfigError listing every impossible setting of a config (nested stages included) and,
  given the workdir `root`, every checkpoint its stages would read and could not use."""
  problems: list[str] = []
  _check(problems, config, "", num_devices or jax.device_count(), None)
  if root is not None:
    problems.extend(checkpoint_problems(config, root))
  config_checks.raise_if_any(config.get("stage"), problems)


# ---------------------------------------------------------------------------------------------------
# Running.


def main_job_stages(variant_configs: Mapping[str, ml_collections.ConfigDict]) -> list[str]:
  """The upstream stages of a main job, in order, from its stages' configs (a variant's defaults when
  configs/meta.py builds it, the overridden ones when the job runs): the optional ones only when
  another stage's `workdir:` path reads them."""
  referenced = set().union(*(workdir.stages_referenced(c) for c in variant_configs.values()))
  return [name for name in UPSTREAM
          if name in variant_configs and (not REGISTRY[name].optional or name in referenced)]


def _reuse(root: str, stage: Stage, stage_config: ml_collections.ConfigDict) -> bool:
  """Whether a stage's folder can be reused as it is; raises when it was built from other inputs.

  A folder that read a stage built again since is deleted (so it runs again from scratch).
  """
  directory = workdir.stage_dir(root, stage.name)
  saved = workdir.read_fingerprint(root, stage.name)
  if saved is None:
    # Nothing built yet, or a folder of an older version: its config.json is what can be checked.
    differences, stale = workdir.config_differences(root, stage.name, stage_config), []
  else:
    differences, stale = workdir.fingerprint_differences(
        saved, stage.fingerprint(stage_config, root))
  if differences:
    raise workdir.StaleStageError(
        f"{directory} was trained with other settings or data than config.stages.{stage.name} "
        f"asks for ({'; '.join(differences[:5])}{'; ...' if len(differences) > 5 else ''}): add "
        f"{stage.name} to --config.rerun to train it again, or use another --workdir.")
  if stale:
    logging.info("pipeline: %s is out of date (%s); running it again", directory, "; ".join(stale))
    workdir.remove(directory)
    return False
  return True


def run_upstream(config: ml_collections.ConfigDict, root: str) -> list[str]:
  """Runs the main job's upstream stages whose outputs are missing, stale or asked for again, in
  `STAGES` order; returns those it ran."""
  rerun = parse_rerun(config.rerun)
  # Decided on the stages as overridden: an optional stage no other stage reads any more is not run.
  wanted = main_job_stages(config.stages)
  ran: list[str] = []
  for stage in STAGES:
    if stage.name not in wanted:
      if stage.name in config.stages and stage.name != MAIN_JOB:
        logging.info("pipeline: no stage reads %s's outputs: not running it", stage.name)
      continue
    stage_config = config.stages[stage.name]
    directory = workdir.stage_dir(root, stage.name)
    if stage.name in rerun and os.path.isdir(directory):
      logging.info("pipeline: --config.rerun names %s: deleting %s and running it again",
                   stage.name, directory)
      workdir.remove(directory)
    if _reuse(root, stage, stage_config) and not workdir.missing(root, stage.name, stage.writes):
      logging.info("pipeline: reusing the finished %s stage in %s", stage.name, directory)
      continue
    logging.info("pipeline: running the %s stage into %s", stage.name, directory)
    run(stage_config, root)
    ran.append(stage.name)
  return ran


# Where the data lives may change between training and evaluation (its identity may not: the
# fingerprints check it).
_LOCATIONS = ("data.data_dir", "data.manual_dir")


def _json(value: Any) -> Any:
  return json.loads(json.dumps(value))


def saved_run_config(config: ml_collections.ConfigDict, root: str,
                     explicit: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a workdir's stage was trained with, for `--config.mode=eval`: the command line
  names the stage and the workdir, and may move the data; any other flag it sets (`explicit`:
  dotted key -> value) must agree with the saved run."""
  stage = REGISTRY[config.stage]
  directory = (ensemble.output_dir(root, config) if stage.name == MAIN_JOB
               else workdir.stage_dir(root, stage.name))
  saved_path = os.path.join(directory, workdir.CONFIG)
  if not os.path.isfile(saved_path):
    raise workdir.StageNotTrained(
        f"{saved_path} not found: nothing was trained into {directory} to evaluate; train it "
        "first (the same command without --config.mode=eval).")
  saved = ml_collections.ConfigDict(workdir.read_json(saved_path))
  flat = workdir.flatten(saved.to_dict())
  contradictions = [
      f"--config.{key}={value!r} (the run saved in {saved_path} has {flat[key]!r})"
      for key, value in sorted(explicit.items())
      if key != "mode" and not key.endswith(_LOCATIONS) and key in flat
      and _json(value) != _json(flat[key])]
  if contradictions:
    raise config_checks.ConfigError(
        f"--config.mode=eval evaluates the run saved in {directory} with its own settings, but "
        f"{'; '.join(contradictions)}: drop those flags, or train with them in another --workdir.")
  saved.mode = "eval"
  for key, value in explicit.items():
    if key.endswith(_LOCATIONS):
      set_field(saved, key, value)
  return saved


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted field (`stages.text.num_epochs`) as `--config.<key>=<value>` would."""
  *parents, name = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value


def run(config: ml_collections.ConfigDict, root: str,
        explicit: Mapping[str, Any] | None = None) -> Any:
  """Checks the config and every checkpoint its stages read (every problem at once, before any
  work), then runs its stage; the main job first runs the upstream stages it needs.

  With `explicit` (the flags given on the command line, dotted key -> value), eval mode takes the
  settings of the run saved in the workdir (`saved_run_config`) instead of the config file's.
  """
  if explicit is not None and config.get("mode") == "eval":
    config = saved_run_config(config, root, explicit)
  validate(config, root=root)
  stage = REGISTRY[config.stage]
  directory = (ensemble.output_dir(root, config) if stage.name == MAIN_JOB
               else workdir.stage_dir(root, stage.name))
  # One read of each catalogue for the whole job: its photos are fingerprinted once, not per stage.
  with workdir.StageLock(directory), builders.catalogues_read_once():
    if stage.name == MAIN_JOB and config.mode == "train":
      run_upstream(config, root)
    return stage.run(workdir.resolve_paths(config, root), root)
