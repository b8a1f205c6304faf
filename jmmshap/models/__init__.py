"""The base learners' Flax NNX models and the import of Hugging Face / torchvision checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from jmmshap.models import bert, clip_vision, hf, resnet
from jmmshap.models.hf import CheckpointError, ModelTypeError

# config.json's model type -> our config dataclass, read without loading weights.
_PARSERS = {"bert": bert.BertConfig.from_hf, "clip": clip_vision.CLIPVisionConfig.from_hf,
            "clip_vision_model": clip_vision.CLIPVisionConfig.from_hf,
            "resnet": resnet.ResNetConfig.from_hf}


def from_pretrained(path: str, **kwargs: Any) -> tuple[Any, Any]:
  """Builds the Flax model a checkpoint describes and loads its weights: returns (model, config).

  `path` is a Hugging Face folder (config.json + model.safetensors), or its hub name, of a BertModel /
  BertForSequenceClassification, CLIPModel / CLIPVisionModel (the vision tower, as the MMBT uses it;
  `clip.from_pretrained` imports a whole CLIPModel) or ResNetModel / ResNetForImageClassification, or
  a torchvision ResNet state-dict file. Keyword arguments go to the
  model file's own `from_pretrained` (e.g. `num_labels`, `dtype`, `param_dtype`, `rngs`).
  """
  path = hf.resolve_path(path)
  if os.path.isfile(path):
    return resnet.from_torchvision(path, **kwargs)
  hf_config = hf.read_config(path)
  model_type = hf_config.get("model_type")
  if model_type == "bert":
    return bert.from_pretrained(path, hf_config, **kwargs)
  if model_type in ("clip", "clip_vision_model"):
    return clip_vision.from_pretrained(path, hf_config, **kwargs)
  if model_type == "resnet":
    return resnet.from_pretrained(path, hf_config, **kwargs)
  raise CheckpointError(
      f"{path}: config.json has model_type={model_type!r}; supported are 'bert', 'clip', "
      "'clip_vision_model' and 'resnet' (or a torchvision ResNet state-dict file).")


def architecture(path: str, model_types: Sequence[str] | None = None,
                 **overrides: Any) -> dict[str, Any]:
  """The architecture a checkpoint describes, as a JSON-able dict (its model type and our config
  dataclass's fields), read from config.json without loading weights (a torchvision file is read
  whole: its shapes are its config). `model_types`: the ones the caller can build (another is a
  `ModelTypeError`, before any field is read). `overrides` are config fields the caller changes at
  load time (e.g. `num_hidden_layers` for a cut BERT, `image_size` for a resized CLIP), checked as
  the loaders check them: a field the model lacks or a value it cannot take is a CheckpointError."""
  path = hf.resolve_path(path)
  if os.path.isfile(path):
    model_type = "resnet"
  else:
    hf_config = hf.read_config(path)
    model_type = hf_config.get("model_type")
  if model_types is not None and model_type not in model_types:
    raise hf.ModelTypeError(path, model_type, model_types)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if os.path.isfile(path):
    config = resnet.torchvision_config(path, hf.read_tensors(path))
  elif model_type not in _PARSERS:
    raise CheckpointError(f"{path}: config.json has model_type={model_type!r}; supported are "
                          f"{', '.join(sorted(_PARSERS))}.")
  else:
    try:
      config = _PARSERS[model_type](hf_config)
    except (TypeError, ValueError) as error:
      raise CheckpointError(f"{path}/config.json: {error}") from None
  if model_type == "bert":
    config = bert.cut(path, config, overrides.pop("num_hidden_layers", None))
  unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(config)})
  if unknown:
    raise CheckpointError(f"{path}: a {model_type!r} model has no {', '.join(unknown)}.")
  try:
    config = dataclasses.replace(config, **overrides)
  except ValueError as error:
    raise CheckpointError(f"{path}: {error}") from None
  return {"model_type": model_type, **json.loads(json.dumps(dataclasses.asdict(config)))}


__all__ = ["CheckpointError", "ModelTypeError", "architecture", "from_pretrained"]
