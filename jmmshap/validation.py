"""Config checks that run before any work: a bad combination fails in a second, not an hour in.

`validate(config)` collects every problem of a stage config (for the meta stage: of each nested stage
too) and raises one `ConfigError` listing them all with the setting to change. Checks that need data
or checkpoints (class counts, tensor shapes) stay where those are read; here is what the config
alone decides.
"""

from __future__ import annotations

import ml_collections

STAGES = ("text", "image", "clip_pretrain", "mmbt", "mmshap", "meta")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")


class ConfigError(ValueError):
  """A config whose settings cannot work together."""


def _device_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.device_count()


def _positive(problems: list[str], config: ml_collections.ConfigDict, prefix: str,
              *names: str) -> None:
  for name in names:
    value = config.get(name)
    if value is not None and (not isinstance(value, int) or value <= 0):
      problems.append(f"{prefix}{name}={value!r}: must be a positive integer.")


def _divisible(problems: list[str], config: ml_collections.ConfigDict, prefix: str, devices: int,
               *names: str) -> None:
  for name in names:
    value = config.get(name)
    if isinstance(value, int) and value > 0 and value % devices:
      problems.append(f"{prefix}{name}={value} does not split over the {devices} devices: use a "
                      f"multiple of {devices}.")


def _check_common(problems, config, prefix, devices) -> None:
  if config.get("mode") is not None and config.mode not in ("train", "eval"):
    problems.append(f"{prefix}mode={config.mode!r}: use 'train' or 'eval'.")
  if config.get("dtype") is not None and config.dtype not in DTYPES:
    problems.append(f"{prefix}dtype={config.dtype!r}: use one of {', '.join(DTYPES)}.")
  _positive(problems, config, prefix, "batch_size", "eval_batch_size")
  _divisible(problems, config, prefix, devices, "batch_size", "eval_batch_size")
  if config.get("num_epochs") is not None and not config.get("total_steps"):
    _positive(problems, config, prefix, "num_epochs")
  optimizer = config.get("optimizer")
  if optimizer is not None:
    if optimizer.get("name") not in OPTIMIZERS:
      problems.append(f"{prefix}optimizer.name={optimizer.get('name')!r}: use one of "
                      f"{', '.join(OPTIMIZERS)}.")
    if not optimizer.get("learning_rate", 0) > 0:
      problems.append(f"{prefix}optimizer.learning_rate={optimizer.get('learning_rate')!r}: must be > 0.")
    if optimizer.get("schedule") not in (None, *SCHEDULES):
      problems.append(f"{prefix}optimizer.schedule={optimizer.schedule!r}: use one of "
                      f"{', '.join(SCHEDULES)}.")


def _check_clip(problems, clip, image_size, prefix) -> None:
  if image_size % clip.patch_size:
    problems.append(f"{prefix}model.clip.patch_size={clip.patch_size} does not divide "
                    f"data.image_size={image_size}: the last pixels would be dropped.")
  if clip.hidden_size % clip.num_attention_heads:
    problems.append(f"{prefix}model.clip.hidden_size={clip.hidden_size} is not a multiple of "
                    f"num_attention_heads={clip.num_attention_heads}.")


def _check_mmbt(problems, config, prefix) -> None:
  from jmmshap.models import mmbt  # pylint: disable=g-import-not-at-top
  model = config.model
  if model.num_image_embeddings not in mmbt.POOLING_GRIDS:
    problems.append(f"{prefix}model.num_image_embeddings={model.num_image_embeddings} is not in the "
                    f"pooling table; use one of {sorted(mmbt.POOLING_GRIDS)}.")
  if model.text_masking not in mmbt.TEXT_MASKINGS:
    problems.append(f"{prefix}model.text_masking={model.text_masking!r}: use one of "
                    f"{mmbt.TEXT_MASKINGS}.")
  if model.image_masking not in mmbt.IMAGE_MASKINGS:
    problems.append(f"{prefix}model.image_masking={model.image_masking!r}: use one of "
                    f"{mmbt.IMAGE_MASKINGS}.")
  if model.image_tower not in ("clip", "resnet"):
    problems.append(f"{prefix}model.image_tower={model.image_tower!r}: use 'clip' or 'resnet'.")
  elif model.image_tower == "clip" and not config.get("init_from_image"):
    _check_clip(problems, model.clip, config.data.image_size, prefix)


def _check_mmshap(problems, config, prefix, devices, num_image_embeddings=None) -> None:
  from jmmshap import mmshap, shapley  # pylint: disable=g-import-not-at-top
  for name, allowed in (("method", mmshap.METHODS), ("value", mmshap.VALUES),
                        ("text_players", mmshap.TEXT_GROUPINGS)):
    if config.get(name) not in allowed:
      problems.append(f"{prefix}{name}={config.get(name)!r}: use one of {allowed}.")
  cap = shapley.MAX_EXACT_PLAYERS
  if not 0 <= config.max_exact_players <= cap:
    problems.append(f"{prefix}max_exact_players={config.max_exact_players}: exact Shapley values "
                    f"enumerate 2**p coalitions; use at most {cap} (KernelSHAP takes over above).")
  if config.method == "exact":
    if not config.max_text_players:
      problems.append(f"{prefix}method='exact' with max_text_players=0 (one player per word): a long "
                      f"title exceeds the exact cap of {cap} players; set max_text_players or use "
                      "method='auto'.")
    elif num_image_embeddings is not None and config.max_text_players + num_image_embeddings > cap:
      problems.append(f"{prefix}method='exact': max_text_players={config.max_text_players} + "
                      f"{num_image_embeddings} image players exceed the exact cap of {cap}.")
  _positive(problems, config, prefix, "chunk_size", "examples_per_group")
  _divisible(problems, config, prefix, devices, "chunk_size", "examples_per_group")


def _check_meta(problems, config, devices) -> None:
  from jmmshap import meta  # pylint: disable=g-import-not-at-top
  try:
    weightings = meta.parse_weightings(config.meta.weighting)
  except ValueError as error:
    problems.append(str(error))
    weightings = ()
  try:
    meta.parse_rerun(config.rerun)
  except ValueError as error:
    problems.append(str(error))
  mmshap_config = config.stages.get("mmshap")
  if "sample" in weightings and mmshap_config is not None and mmshap_config.max_examples:
    problems.append(
        f"meta.weighting includes 'sample', which needs MM-SHAP shares of every validation and test "
        f"example, but stages.mmshap.max_examples={mmshap_config.max_examples} explains only the "
        "first ones: set stages.mmshap.max_examples=0 or drop 'sample' from meta.weighting.")
  _positive(problems, config.meta, "meta.", "num_steps", "hidden_size", "eval_every_steps")
  if config.meta.checkpoint_every_steps % config.meta.eval_every_steps:
    problems.append(f"meta.checkpoint_every_steps={config.meta.checkpoint_every_steps} is not a "
                    f"multiple of meta.eval_every_steps={config.meta.eval_every_steps}.")
  for name, stage in config.stages.items():
    num_image = (config.stages.mmbt.model.num_image_embeddings
                 if name == "mmshap" and "mmbt" in config.stages else None)
    _check_stage(problems, stage, f"stages.{name}.", devices, num_image)


def _check_stage(problems, config, prefix, devices, num_image_embeddings=None) -> None:
  stage = config.get("stage")
  if stage not in STAGES:
    problems.append(f"{prefix}stage={stage!r}: known stages are {', '.join(STAGES)}.")
    return
  _check_common(problems, config, prefix, devices)
  if stage == "mmbt":
    _check_mmbt(problems, config, prefix)
  elif stage == "clip_pretrain":
    _check_clip(problems, config.model.clip, config.data.image_size, prefix)
  elif stage == "mmshap":
    _check_mmshap(problems, config, prefix, devices, num_image_embeddings)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every impossible setting of a stage config; returns if none."""
  devices = num_devices or _device_count()
  problems: list[str] = []
  if config.get("stage") == "meta":
    _check_common(problems, config, "", devices)
    _check_meta(problems, config, devices)
  else:
    _check_stage(problems, config, "", devices)
  if problems:
    raise ConfigError(f"config.stage={config.get('stage')!r}: {len(problems)} setting(s) cannot work:\n  "
                      + "\n  ".join(problems))
