"""The base learners' Flax NNX models and the import of Hugging Face / torchvision checkpoints."""

from __future__ import annotations

import os
from typing import Any

from jmmshap.models import bert, clip_vision, hf, resnet
from jmmshap.models.hf import CheckpointError


def from_pretrained(path: str, **kwargs: Any) -> tuple[Any, Any]:
  """Builds the Flax model a checkpoint describes and loads its weights: returns (model, config).

  `path` is a Hugging Face folder (config.json + model.safetensors) of a BertModel /
  BertForSequenceClassification, CLIPModel / CLIPVisionModel or ResNetModel /
  ResNetForImageClassification, or a torchvision ResNet state-dict file. Keyword arguments go to the
  model file's own `from_pretrained` (e.g. `num_labels`, `dtype`, `param_dtype`, `rngs`).
  """
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


__all__ = ["CheckpointError", "from_pretrained"]
