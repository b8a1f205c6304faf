"""The shared vocabulary of config checks: a bad combination fails in a second, not an hour in.

Each stage module checks its own settings (`check_config` next to the code that reads them) and the
pipeline collects every problem of a config, the nested stages of the main job included, into one
`ConfigError`. Here is what several stages share: the run settings every stage has (mode, dtype,
batch sizes, optimizer) and the CLIP tower's shape rules. Checks that need data or checkpoints
(class counts, tensor shapes) stay where those are read; the pretrained checkpoints a stage starts
from are checked by `pretrained.py`, which the stages read them through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from jmmshap import errors

MODES = ("train", "eval")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")


class ConfigError(ValueError, errors.UserError):
  """A config whose settings cannot work together."""


def one_of(problems: list[str], prefix: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    problems.append(f"{prefix}{name}={value!r}: use one of {', '.join(map(str, allowed))}.")


def positive(problems: list[str], config: ml_collections.ConfigDict, prefix: str,
             *names: str) -> None:
  for name in names:
    value = config.get(name)
    if value is not None and (not isinstance(value, int) or value <= 0):
      problems.append(f"{prefix}{name}={value!r}: must be a positive integer.")


def divisible(problems: list[str], config: ml_collections.ConfigDict, prefix: str, devices: int,
              *names: str) -> None:
  for name in names:
    value = config.get(name)
    if isinstance(value, int) and value > 0 and value % devices:
      problems.append(f"{prefix}{name}={value} does not split over the {devices} devices: use a "
                      f"multiple of {devices}.")


def at_least(problems: list[str], config: ml_collections.ConfigDict, prefix: str, minimum: int,
             *names: str, why: str = "") -> None:
  for name in names:
    value = config.get(name)
    if value is not None and (not isinstance(value, int) or value < minimum):
      problems.append(f"{prefix}{name}={value!r}: must be an integer >= {minimum}{why}.")


def fraction(problems: list[str], config: ml_collections.ConfigDict, prefix: str,
             *names: str) -> None:
  """Settings that must be a number in [0, 1) (0: off), e.g. label smoothing, an EMA decay."""
  for name in names:
    value = config.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 <= value < 1):
      problems.append(f"{prefix}{name}={value!r}: must be a number in [0, 1) (0: off).")


def interval(problems: list[str], config: ml_collections.ConfigDict, prefix: str, name: str,
             low: float, high: float) -> None:
  """A (min, max) setting from which values are drawn: low < min <= max <= high."""
  value = config.get(name)
  try:
    first, last = (float(v) for v in value)
    valid = low < first <= last <= high
  except (TypeError, ValueError):
    valid = False
  if not valid:
    upper = "" if high == float("inf") else f" <= {high:g}"
    problems.append(f"{prefix}{name}={value!r}: must be (min, max) with {low:g} < min <= max"
                    f"{upper}.")


def check_run_settings(problems: list[str], config: ml_collections.ConfigDict, prefix: str,
                       devices: int) -> None:
  """The settings every trained stage shares: mode, dtype, seed, batch sizes, steps, checkpoints,
  optimizer."""
  if config.get("mode") is not None and config.mode not in MODES:
    problems.append(f"{prefix}mode={config.mode!r}: use 'train' or 'eval'.")
  at_least(problems, config, prefix, 0, "seed")
  at_least(problems, config, prefix, 0, "total_steps", why=" (0: num_epochs decides)")
  at_least(problems, config, prefix, 1, "keep_checkpoints")
  if config.get("dtype") is not None:
    one_of(problems, prefix, "dtype", config.dtype, DTYPES)
  positive(problems, config, prefix, "batch_size", "eval_batch_size")
  divisible(problems, config, prefix, devices, "batch_size", "eval_batch_size")
  if config.get("num_epochs") is not None and not config.get("total_steps"):
    positive(problems, config, prefix, "num_epochs")
  optimizer = config.get("optimizer")
  if optimizer is not None:
    check_optimizer(problems, optimizer, f"{prefix}optimizer.")


def check_optimizer(problems: list[str], optimizer: ml_collections.ConfigDict, prefix: str) -> None:
  one_of(problems, prefix, "name", optimizer.get("name"), OPTIMIZERS)
  if not optimizer.get("learning_rate", 0) > 0:
    problems.append(f"{prefix}learning_rate={optimizer.get('learning_rate')!r}: must be > 0.")
  if optimizer.get("schedule") is not None:
    one_of(problems, prefix, "schedule", optimizer.schedule, SCHEDULES)


def check_clip_tower(problems: list[str], clip: ml_collections.ConfigDict, image_size: int,
                     prefix: str) -> None:
  """A CLIP vision tower built from settings (clip_pretrain, and the MMBT without a checkpoint)."""
  if image_size % clip.patch_size:
    problems.append(f"{prefix}model.clip.patch_size={clip.patch_size} does not divide "
                    f"data.image_size={image_size}: the last pixels would be dropped.")
  if clip.hidden_size % clip.num_attention_heads:
    problems.append(f"{prefix}model.clip.hidden_size={clip.hidden_size} is not a multiple of "
                    f"num_attention_heads={clip.num_attention_heads}.")


def raise_if_any(stage: str | None, problems: Sequence[str]) -> None:
  """One problem is one line (the command line prints it as `error: <message>`); several are
  listed one a line under a count."""
  if len(problems) == 1:
    raise ConfigError(f"config.stage={stage!r}: {problems[0]}")
  if problems:
    raise ConfigError(f"config.stage={stage!r}: {len(problems)} setting(s) cannot work:\n  "
                      + "\n  ".join(problems))
