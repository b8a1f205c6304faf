"""The base learners' Flax NNX models and the import of Hugging Face / torchvision checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jmmshap.models import bert, clip_vision, hf, resnet
from jmmshap.models.hf import CheckpointError


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


def architecture(path: str, **overrides: Any) -> dict[str, Any]:
  """The architecture a checkpoint describes, as a JSON-able dict (its model type and our config
  dataclass's fields), read from config.json without loading weights (a torchvision file is read
  whole: its shapes are its config). `overrides` are config fields the caller changes at load time
  (e.g. `num_hidden_layers` for a cut BERT, `image_size` for a resized CLIP)."""
  path = hf.resolve_path(path)
  if os.path.isfile(path):
    config = resnet.torchvision_config(path, hf.read_tensors(path))
    model_type = "resnet"
  else:
    hf_config = hf.read_config(path)
    model_type = hf_config.get("model_type")
    parsers = {"bert": bert.BertConfig.from_hf, "clip": clip_vision.CLIPVisionConfig.from_hf,
               "clip_vision_model": clip_vision.CLIPVisionConfig.from_hf,
               "resnet": resnet.ResNetConfig.from_hf}
    if model_type not in parsers:
      raise CheckpointError(f"{path}: config.json has model_type={model_type!r}; supported are "
                            f"{', '.join(sorted(parsers))}.")
    config = parsers[model_type](hf_config)
  config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
  return {"model_type": model_type, **json.loads(json.dumps(dataclasses.asdict(config)))}


__all__ = ["CheckpointError", "architecture", "from_pretrained"]
