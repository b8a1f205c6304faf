"""The pipeline's stages and how `train.py` dispatches to them by `config.stage`.

A classifier stage is a model builder plus the batch fields the model reads; `train_lib` does the rest.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from jmmshap import train_lib
from jmmshap.models import bert, clip_vision, hf, mmbt, resnet
from jmmshap.tokenizer import TitleTokenizer


def _rngs(config: ml_collections.ConfigDict) -> nnx.Rngs:
  return nnx.Rngs(params=config.seed, dropout=config.seed + 1)


def _dtypes(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Compute dtype from `config.dtype` ("bfloat16" for mixed precision); params stay float32."""
  return {"dtype": jnp.dtype(config.get("dtype", "float32")), "param_dtype": jnp.float32}


def build_bert(model_config: ml_collections.ConfigDict, tokenizer: TitleTokenizer,
               max_positions: int, rngs: nnx.Rngs, **dtypes: Any) -> bert.BertModel:
  bert_config = bert.BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_positions,
                                pad_token_id=tokenizer.pad_id, **model_config.to_dict())
  logging.info("BERT: %s", bert_config)
  return bert.BertModel(bert_config, rngs=rngs, **dtypes)


def pretrained_bert(path: str, rngs: nnx.Rngs, num_layers: int = 0, **dtypes: Any) -> bert.BertModel:
  """A HF BERT folder's encoder, cut to its first `num_layers` layers (0: all)."""
  model, _ = bert.from_pretrained(path, hf.read_config(path), num_hidden_layers=num_layers or None,
                                  rngs=rngs, **dtypes)
  return model.bert if isinstance(model, bert.BertForSequenceClassification) else model


def resnet_config(model_config: ml_collections.ConfigDict) -> resnet.ResNetConfig:
  """ResNet of `depth` whose stage widths are `width` x (1, 2, 4, 8) (x4 for bottleneck blocks)."""
  layer_type, _ = resnet.DEPTH_PRESETS.get(model_config.depth, ("basic", None))
  expansion = 4 if layer_type == "bottleneck" else 1
  return resnet.ResNetConfig(
      depth=model_config.depth, embedding_size=model_config.width, small_stem=model_config.small_stem,
      hidden_sizes=tuple(model_config.width * expansion * m for m in (1, 2, 4, 8)))


def build_text_model(config: ml_collections.ConfigDict, num_classes: int,
                     tokenizer: TitleTokenizer | None) -> nnx.Module:
  """BERT for sequence classification: from `init_from` (a HF BERT folder) or from scratch."""
  rngs, dtypes = _rngs(config), _dtypes(config)
  if config.get("init_from"):
    model, _ = bert.from_pretrained(config.init_from, hf.read_config(config.init_from),
                                    num_labels=num_classes, rngs=rngs, **dtypes)
    return model
  bert_config = bert.BertConfig(vocab_size=tokenizer.vocab_size,
                                max_position_embeddings=config.data.max_length,
                                pad_token_id=tokenizer.pad_id, **config.model.to_dict())
  logging.info("BERT: %s", bert_config)
  return bert.BertForSequenceClassification(bert_config, num_labels=num_classes, rngs=rngs, **dtypes)


def build_image_model(config: ml_collections.ConfigDict, num_classes: int,
                      tokenizer: TitleTokenizer | None) -> nnx.Module:
  """A ResNet classifier: from `init_from` (HF folder or torchvision file) or from scratch."""
  del tokenizer
  rngs, dtypes = _rngs(config), _dtypes(config)
  if config.get("init_from"):
    from jmmshap import models  # pylint: disable=g-import-not-at-top
    model, _ = models.from_pretrained(config.init_from, num_labels=num_classes, rngs=rngs, **dtypes)
    return model
  model_config = resnet_config(config.model)
  logging.info("ResNet: %s", model_config)
  return resnet.ResNet(model_config, num_labels=num_classes, rngs=rngs, **dtypes)


def build_mmbt_model(config: ml_collections.ConfigDict, num_classes: int,
                     tokenizer: TitleTokenizer | None) -> nnx.Module:
  """CLIP-MMBT (or ResNet-MMBT); each tower from its checkpoint folder or from scratch."""
  rngs, dtypes = _rngs(config), _dtypes(config)
  model_config = config.model
  image_size = config.data.image_size
  if model_config.image_tower == "clip":
    if config.get("init_from_image"):
      vision, _ = clip_vision.from_pretrained(config.init_from_image, image_size=image_size, **dtypes)
    else:
      vision = clip_vision.CLIPVisionModel(
          clip_vision.CLIPVisionConfig(image_size=image_size, **model_config.clip.to_dict()),
          rngs=rngs, **dtypes)
  elif model_config.image_tower == "resnet":
    vision = resnet.ResNet(resnet_config(model_config.resnet), rngs=rngs, **dtypes)
  else:
    raise ValueError(f"model.image_tower={model_config.image_tower!r}: use 'clip' or 'resnet'")
  max_positions = max(config.data.max_length, model_config.num_image_embeddings + 2)
  text = (pretrained_bert(config.init_from_text, rngs, config.get("init_from_text_layers", 0), **dtypes)
          if config.get("init_from_text")
          else build_bert(model_config.bert, tokenizer, max_positions, rngs, **dtypes))
  mmbt_config = mmbt.MMBTConfig(
      num_image_embeddings=model_config.num_image_embeddings, cls_token_id=tokenizer.cls_id,
      sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id,
      text_masking=model_config.text_masking, image_masking=model_config.image_masking,
      classifier_dropout=model_config.classifier_dropout)
  return mmbt.MMBT(mmbt_config, text, vision, num_classes, rngs=rngs, **dtypes)


TEXT = train_lib.ClassifierStage(
    name="text", inputs=("input_ids", "attention_mask", "token_type_ids"),
    build_model=build_text_model, uses_text=True, uses_image=False)
IMAGE = train_lib.ClassifierStage(
    name="image", inputs=("pixel_values",), build_model=build_image_model,
    uses_text=False, uses_image=True)
MMBT = train_lib.ClassifierStage(
    name="mmbt", inputs=("input_ids", "attention_mask", "token_type_ids", "pixel_values"),
    build_model=build_mmbt_model, uses_text=True, uses_image=True)

CLASSIFIERS = {stage.name: stage for stage in (TEXT, IMAGE, MMBT)}


WORKDIR_PREFIX = "workdir:"
_CHECKPOINT_KEYS = ("init_from", "init_from_text", "init_from_image")


def resolve_workdir_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`workdir:<path>` checkpoint settings name an earlier stage's output inside this run's workdir.

  So a config can say where the MMBT's vision tower comes from (`workdir:clip_pretrain/export`)
  before anyone has chosen the workdir.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # Locked configs stay untouched.
  for key in _CHECKPOINT_KEYS:
    value = config.get(key)
    if isinstance(value, str) and value.startswith(WORKDIR_PREFIX):
      config[key] = os.path.join(workdir, value[len(WORKDIR_PREFIX):])
  return config


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config (every problem at once, before any work), then runs its stage."""
  from jmmshap import validation  # pylint: disable=g-import-not-at-top
  validation.validate(config)
  if config.stage == "clip_pretrain":
    from jmmshap import clip_pretrain  # pylint: disable=g-import-not-at-top
    return clip_pretrain.run(config, workdir)
  if config.stage in CLASSIFIERS:
    return train_lib.train_and_evaluate(resolve_workdir_paths(config, workdir), workdir,
                                        CLASSIFIERS[config.stage])
  if config.stage == "mmshap":
    from jmmshap import mmshap  # pylint: disable=g-import-not-at-top  (mmshap imports this module)
    return mmshap.run(config, workdir)
  if config.stage == "meta":
    from jmmshap import meta  # pylint: disable=g-import-not-at-top  (meta runs the other stages)
    return meta.run(config, workdir)
  raise ValueError(f"config.stage={config.stage!r}: known stages are "
                   f"{sorted([*CLASSIFIERS, 'clip_pretrain', 'mmshap', 'meta'])}")
