"""The classifier stages: text (BERT), image (ResNet) and mmbt (CLIP-MMBT) learners.

A classifier stage is a model builder plus the batch fields the model reads; `train_lib.fit` trains
it, with the best checkpoint chosen by validation macro F1. Each stage folder (`workdir.py`) ends
with the best checkpoint's `metrics.json` and `logits_{validation,test}.npz`, which the meta stage
stacks, and `load_trained` rebuilds a finished stage for MM-SHAP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jmmshap import (builders, checkpoints, config_checks, input_pipeline, metrics, models, parallel,
                     photos, pretrained, train_lib, workdir)
from jmmshap.models import bert, clip_vision, hf, mmbt, resnet
from jmmshap.tokenizer import TitleTokenizer

SELECTION = train_lib.Selection("f1_macro", higher_is_better=True)


@dataclasses.dataclass(frozen=True)
class ClassifierStage:
  """What differs between the text, image and multimodal learners."""
  name: str
  inputs: tuple[str, ...]  # batch keys passed to the model by name, e.g. ("input_ids", ...)
  build_model: Callable[[ml_collections.ConfigDict, int, TitleTokenizer | None], nnx.Module]
  uses_text: bool
  uses_image: bool


# ---------------------------------------------------------------------------------------------------
# Models.


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


IMAGE_KINDS = ("resnet", "clip")  # The image learner's architectures (`model.kind`).
# The checkpoint model types each kind (the image learner's `model.kind`, the MMBT's
# `model.image_tower`) starts from.
_IMAGE_CHECKPOINTS = {"resnet": pretrained.RESNET, "clip": pretrained.CLIP}


def image_kind(config: ml_collections.ConfigDict) -> str:
  """The image learner's architecture; configs saved before `model.kind` existed are ResNets."""
  return config.model.get("kind", "resnet")


def build_image_model(config: ml_collections.ConfigDict, num_classes: int,
                      tokenizer: TitleTokenizer | None) -> nnx.Module:
  """A ResNet classifier, or (model.kind='clip') a CLIP vision tower with a linear head; from
  `init_from` (a HF folder, a torchvision file for the ResNet) or from scratch."""
  del tokenizer
  rngs, dtypes = _rngs(config), _dtypes(config)
  if image_kind(config) == "clip":
    if config.get("init_from"):
      vision, _ = clip_vision.from_pretrained(config.init_from, image_size=config.data.image_size,
                                              **dtypes)
    else:
      # The tower's record (a checkpoint's architecture also names its model type and image size;
      # the stage's data decides the size).
      clip_config = dataclasses.replace(
          clip_vision.CLIPVisionConfig.from_hf(config.model.clip.to_dict()),
          image_size=config.data.image_size)
      logging.info("CLIP vision tower: %s", clip_config)
      vision = clip_vision.CLIPVisionModel(clip_config, rngs=rngs, **dtypes)
    return clip_vision.CLIPVisionClassifier(vision, num_classes, rngs=rngs, **dtypes)
  if config.get("init_from"):
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
    if config.get("init_from_image"):  # E.g. the image learner's export: its tower, not its head.
      vision, _ = models.from_pretrained(config.init_from_image, num_labels=0, **dtypes)
    else:
      vision = resnet.ResNet(resnet_config(model_config.resnet), rngs=rngs, **dtypes)
  else:
    raise ValueError(f"model.image_tower={model_config.image_tower!r}: use 'clip' or 'resnet'")
  max_positions = max(config.data.max_length, model_config.num_image_embeddings + 2)
  text = (bert.encoder_from_pretrained(config.init_from_text, config.get("init_from_text_layers", 0),
                                       rngs=rngs, **dtypes)
          if config.get("init_from_text")
          else build_bert(model_config.bert, tokenizer, max_positions, rngs, **dtypes))
  mmbt_config = mmbt.MMBTConfig(
      num_image_embeddings=model_config.num_image_embeddings, cls_token_id=tokenizer.cls_id,
      sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id,
      text_masking=model_config.text_masking, image_masking=model_config.image_masking,
      classifier_dropout=model_config.classifier_dropout)
  return mmbt.MMBT(mmbt_config, text, vision, num_classes, rngs=rngs, **dtypes)


TEXT = ClassifierStage(
    name="text", inputs=("input_ids", "attention_mask", "token_type_ids"),
    build_model=build_text_model, uses_text=True, uses_image=False)
IMAGE = ClassifierStage(
    name="image", inputs=("pixel_values",), build_model=build_image_model,
    uses_text=False, uses_image=True)
MMBT = ClassifierStage(
    name="mmbt", inputs=("input_ids", "attention_mask", "token_type_ids", "pixel_values"),
    build_model=build_mmbt_model, uses_text=True, uses_image=True)

CLASSIFIERS = {stage.name: stage for stage in (TEXT, IMAGE, MMBT)}


def _other_image_kinds(setting: str, kind: str) -> dict[str, str]:
  """Checkpoint model type -> the image architecture setting that builds on it, for another kind."""
  return {model_type: f"{setting}={other!r}" for other, types in _IMAGE_CHECKPOINTS.items()
          if other != kind for model_type in types}


def pretrained_checkpoints(config: ml_collections.ConfigDict) -> list[pretrained.Checkpoint]:
  """The checkpoints a classifier stage starts from, each with the model it must hold: what
  `effective_config` reads, and what the pipeline checks before any stage runs."""
  found = []
  tokenizer = _tokenizer_key(config)
  if config.stage == TEXT.name and config.get("init_from"):
    found.append(pretrained.Checkpoint("init_from", "the text learner", pretrained.BERT,
                                       tokenizer=tokenizer, positions=config.data.max_length))
  elif config.stage == IMAGE.name and config.get("init_from"):
    kind = image_kind(config)
    if kind in _IMAGE_CHECKPOINTS:
      found.append(pretrained.Checkpoint(
          "init_from", f"the image learner's model.kind={kind!r}", _IMAGE_CHECKPOINTS[kind],
          {"image_size": config.data.image_size} if kind == "clip" else {},
          alternatives=_other_image_kinds("model.kind", kind)))
  elif config.stage == MMBT.name:
    if config.get("init_from_text"):
      found.append(pretrained.Checkpoint(
          "init_from_text", "the MMBT's text tower", pretrained.BERT,
          {"num_hidden_layers": config.get("init_from_text_layers") or None}, tokenizer=tokenizer,
          positions=config.data.max_length))
    tower = config.model.get("image_tower")
    if config.get("init_from_image") and tower in _IMAGE_CHECKPOINTS:
      found.append(pretrained.Checkpoint(
          "init_from_image", f"the MMBT's image tower (model.image_tower={tower!r})",
          _IMAGE_CHECKPOINTS[tower],
          {"image_size": config.data.image_size} if tower == "clip" else {},
          alternatives=_other_image_kinds("model.image_tower", tower)))
  if tokenizer and not any(checkpoint.tokenizer for checkpoint in found):
    found.append(pretrained.Checkpoint(tokenizer, f"the {config.stage} stage's tokenizer",
                                       tokenizer=tokenizer))
  return found


def effective_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as the model is built: where a checkpoint decides the architecture, its sizes
  replace the config's model fields (which the checkpoint would override), so that config.json
  and the fingerprint record the model actually trained. A checkpoint the stage cannot build on
  is a CheckpointError naming its setting."""
  config = ml_collections.ConfigDict(config.to_dict())
  found = {checkpoint.key: pretrained.architecture(config, checkpoint)
           for checkpoint in pretrained_checkpoints(config) if checkpoint.model_types}
  if config.stage == IMAGE.name:
    _resolve_image_model(config, found.get("init_from"))
  elif config.stage == TEXT.name and "init_from" in found:
    config.model = found["init_from"]
  elif config.stage == MMBT.name:
    if "init_from_text" in found:
      config.model.bert = found["init_from_text"]
    if "init_from_image" in found and config.model.image_tower == "clip":
      config.model.clip = found["init_from_image"]
    elif "init_from_image" in found and config.model.image_tower == "resnet":
      config.model.resnet = found["init_from_image"]
    _resolve_normalisation(config, clip=config.model.image_tower == "clip")
  return config


def _resolve_normalisation(config: ml_collections.ConfigDict, clip: bool) -> None:
  """`data.image_mean`/`image_std` left empty take the tower's own: CLIP's for a CLIP tower,
  ImageNet's for a ResNet."""
  if "image_mean" not in config.data:  # Configs saved before these fields existed used ImageNet's.
    return
  if config.data.image_mean is None:
    config.data.image_mean = photos.CLIP_MEAN if clip else photos.IMAGENET_MEAN
  if config.data.image_std is None:
    config.data.image_std = photos.CLIP_STD if clip else photos.IMAGENET_STD


def _resolve_image_model(config: ml_collections.ConfigDict,
                         architecture: dict[str, Any] | None) -> None:
  """The image learner's architecture from its checkpoint's (`architecture`, None: none), and its
  normalisation: `data.image_mean`/`image_std` left empty take the tower's own (ImageNet's for
  the ResNet, CLIP's for the CLIP tower)."""
  kind = image_kind(config)
  if architecture is not None:
    if kind == "clip":
      config.model.clip = architecture
    else:
      config.model = {**architecture, **({"kind": kind} if "kind" in config.model else {})}
  _resolve_normalisation(config, clip=kind == "clip")


def _tokenizer_key(config: ml_collections.ConfigDict) -> str | None:
  """The setting naming the folder of a stage's tokenizer: data.tokenizer, else its text
  checkpoint; None: train one on the titles (a text tower trained from scratch)."""
  for key in ("data.tokenizer", "init_from_text", *(("init_from",) if config.stage == TEXT.name
                                                     else ())):
    if pretrained.value(config, key):
      return key
  return None


def tokenizer_source(config: ml_collections.ConfigDict) -> str | None:
  """Where a stage's tokenizer comes from: the one named, else its text checkpoint's; None: train
  one on the titles (only for a text tower trained from scratch)."""
  key = _tokenizer_key(config)
  return pretrained.value(config, key) if key else None


def check_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The training options any classifier may have (label smoothing, EMA, crops, flip averaging),
  the image learner's architecture and the MMBT's model settings."""
  problems: list[str] = []
  check_training_options(problems, config, prefix)
  if config.stage == IMAGE.name:
    config_checks.one_of(problems, prefix, "model.kind", image_kind(config), IMAGE_KINDS)
    if image_kind(config) == "clip" and not config.get("init_from"):
      config_checks.check_clip_tower(problems, config.model.clip, config.data.image_size, prefix)
  if config.stage != MMBT.name:
    return problems
  model = config.model
  if model.num_image_embeddings not in mmbt.POOLING_GRIDS:
    problems.append(f"{prefix}model.num_image_embeddings={model.num_image_embeddings} is not in the "
                    f"pooling table; use one of {sorted(mmbt.POOLING_GRIDS)}.")
  config_checks.one_of(problems, prefix, "model.text_masking", model.text_masking,
                       mmbt.TEXT_MASKINGS)
  config_checks.one_of(problems, prefix, "model.image_masking", model.image_masking,
                       mmbt.IMAGE_MASKINGS)
  config_checks.one_of(problems, prefix, "model.image_tower", model.image_tower, ("clip", "resnet"))
  if model.image_tower == "clip" and not config.get("init_from_image"):
    config_checks.check_clip_tower(problems, model.clip, config.data.image_size, prefix)
  return problems


def check_training_options(problems: list[str], config: ml_collections.ConfigDict,
                           prefix: str) -> None:
  """Label smoothing and EMA decay in [0, 1); crop ranges that can be drawn; photo augmentation
  and flip averaging only for a stage that reads photos."""
  config_checks.fraction(problems, config, prefix, "label_smoothing", "ema_decay")
  if config.get("random_crop"):
    config_checks.interval(problems, config, prefix, "crop_area", 0.0, 1.0)
    config_checks.interval(problems, config, prefix, "crop_aspect_ratio", 0.0, math.inf)
  uses_image = config.stage in CLASSIFIERS and CLASSIFIERS[config.stage].uses_image
  for name in ("random_flip", "random_crop", "eval_flip_average"):
    if config.get(name) and not uses_image:
      problems.append(f"{prefix}{name}=True: the {config.stage} stage reads no photos.")


# ---------------------------------------------------------------------------------------------------
# Steps.


def make_loss(graphdef: nnx.GraphDef, inputs: tuple[str, ...],
              label_smoothing: float = 0.0) -> train_lib.LossFn:
  """Cross-entropy of the model's logits (against smoothed labels with `label_smoothing` > 0); the
  model state (BatchNorm, dropout RNG) is carried."""

  def loss_fn(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    logits = model(**{name: batch[name] for name in inputs})["logits"]
    _, _, model_state = nnx.split(model, nnx.Param, ...)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    loss = train_lib.cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, ({"accuracy": accuracy}, nnx.as_pure(model_state))

  return loss_fn


def make_train_step(graphdef: nnx.GraphDef, inputs: tuple[str, ...],
                    optimizer: Any) -> Callable:
  """(state, batch) -> (state, metrics); state = {step, params, model_state, opt_state}."""
  return train_lib.make_train_step(make_loss(graphdef, inputs), optimizer)


def make_eval_step(graphdef: nnx.GraphDef, inputs: tuple[str, ...], flip_average: bool = False,
                   transform: photos.PhotoTransform | None = None) -> Callable:
  """(params, model state, batch) -> float32 logits; uint8 photos are normalised first
  (`transform`); with `flip_average`, the mean of the logits of each photo and of its mirror image
  (test-time augmentation matching `photos.random_flip`)."""

  def eval_step(params, model_state, batch):
    batch = (transform or photos.PhotoTransform()).evaluation(batch)
    model = nnx.merge(graphdef, params, model_state)

    def logits(batch):
      return model(**{name: batch[name] for name in inputs})["logits"].astype(jnp.float32)

    if not flip_average:
      return logits(batch)
    mirrored = {**batch, "pixel_values": batch["pixel_values"][:, :, ::-1]}
    return (logits(batch) + logits(mirrored)) / 2

  return eval_step


def jit_eval_step(graphdef: nnx.GraphDef, inputs: tuple[str, ...], mesh: jax.sharding.Mesh,
                  flip_average: bool = False,
                  transform: photos.PhotoTransform | None = None) -> Callable:
  """`make_eval_step` compiled for replicated params and model state and a batch sharded over the
  mesh's `data` axis: the one evaluation program of the stages, the predictor and the scripts."""
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(make_eval_step(graphdef, inputs, flip_average, transform),
                 in_shardings=(replicated, replicated, batch_sharding), out_shardings=batch_sharding)


# ---------------------------------------------------------------------------------------------------
# Data.


def load_or_train_tokenizer(config: ml_collections.ConfigDict, directory: str,
                            train_source: input_pipeline.RecordSource) -> TitleTokenizer:
  """The stage's saved tokenizer, else a checkpoint's (data.tokenizer or init_from), else train one."""
  saved = os.path.join(directory, workdir.TOKENIZER)
  max_length = config.data.max_length
  if os.path.isfile(saved):
    return TitleTokenizer.from_folder(directory, max_length=max_length)
  folder = tokenizer_source(config)
  if folder:
    tokenizer = TitleTokenizer.from_folder(folder, max_length=max_length)
  else:
    titles = (input_pipeline.as_text(r["title"]) for r in _iterate(train_source, batch_size=1024))
    tokenizer = TitleTokenizer.train(titles, vocab_size=config.data.vocab_size, max_length=max_length)
  if workdir.is_writer():
    workdir.write_atomically(saved, tokenizer.save)
  return tokenizer


def _iterate(source: input_pipeline.RecordSource, batch_size: int) -> Iterator[dict]:
  for start in range(0, len(source), batch_size):
    yield from input_pipeline.read_records(source, range(start, min(start + batch_size, len(source))))


def make_preprocessor(config: ml_collections.ConfigDict, stage: ClassifierStage,
                      tokenizer: TitleTokenizer | None) -> input_pipeline.Preprocessor:
  return input_pipeline.Preprocessor(
      tokenizer, config.data.image_size if stage.uses_image else None,
      config.data.get("image_mean") or photos.IMAGENET_MEAN,
      config.data.get("image_std") or photos.IMAGENET_STD)


def make_augmentation(config: ml_collections.ConfigDict) -> photos.Augmentation | None:
  """The training-photo augmentation a config asks for (`random_flip`, `random_crop`); None: none."""
  if not (config.get("random_flip") or config.get("random_crop")):
    return None
  return photos.Augmentation(
      flip=bool(config.get("random_flip")),
      crop_area=tuple(config.crop_area) if config.get("random_crop") else None,
      crop_aspect_ratio=tuple(config.get("crop_aspect_ratio", (3 / 4, 4 / 3))))


# ---------------------------------------------------------------------------------------------------
# Evaluation and outputs.


def evaluate(eval_step: Callable, params: Any, model_state: Any,
             source: input_pipeline.RecordSource, preprocess: input_pipeline.Preprocessor,
             batch_size: int, mesh: jax.sharding.Mesh, worker_count: int = 0
             ) -> dict[str, np.ndarray]:
  """Logits for every example of a split, in the split's order, with labels and ids."""
  num_examples = len(source)
  logits = None
  labels = np.zeros(num_examples, np.int32)
  ids = np.empty(num_examples, dtype=object)
  batches = input_pipeline.eval_loader(
      source, preprocess, global_batch_size=batch_size, worker_count=worker_count,
      transform=lambda batch: (batch, parallel.to_global(batch, mesh)))
  try:
    for batch, on_devices in batches:
      batch_logits = multihost_utils.process_allgather(
          eval_step(params, model_state, on_devices), tiled=True)
      index = multihost_utils.process_allgather(batch["index"], tiled=True)
      batch_labels = multihost_utils.process_allgather(batch["label"], tiled=True)
      if logits is None:
        logits = np.zeros((num_examples, batch_logits.shape[-1]), np.float32)
      real = index >= 0
      logits[index[real]] = batch_logits[real]
      labels[index[real]] = batch_labels[real]
      local = batch["index"] >= 0
      ids[batch["index"][local]] = batch["id"][local]
  finally:
    batches.close()
  if jax.process_count() > 1:  # Each process saw only its own rows' ids.
    missing = np.flatnonzero(ids == None)  # pylint: disable=singleton-comparison
    for i, record in zip(missing, input_pipeline.read_records(source, missing)):
      ids[i] = input_pipeline.as_text(record["id"])
  return {"logits": logits, "labels": labels, "ids": ids.astype(str)}


def validation_scores(result: dict[str, np.ndarray], num_classes: int) -> dict[str, float]:
  """The validation record of log.jsonl: loss, then the classification metrics."""
  scores = metrics.classification_metrics(result["labels"], result["logits"].argmax(-1),
                                          num_classes)
  loss = float(train_lib.cross_entropy(result["logits"], result["labels"]).mean())
  return {"loss": loss, **scores}


def write_outputs(directory: str, results: dict[str, dict[str, np.ndarray]], class_names: list[str],
                  num_classes: int) -> dict[str, dict[str, float]]:
  """metrics.json and logits_{split}.npz from evaluated splits."""
  report = {}
  for split, result in results.items():
    report[split] = metrics.classification_metrics(result["labels"], result["logits"].argmax(-1),
                                                   num_classes)
    if workdir.is_writer():
      arrays = {"logits": result["logits"], "labels": result["labels"], "ids": result["ids"],
                "class_names": np.asarray(class_names)}
      workdir.write_atomically(os.path.join(directory, workdir.logits_file(split)),
                               lambda partial, arrays=arrays: np.savez(partial, **arrays))
  if workdir.is_writer():
    workdir.write_json(os.path.join(directory, workdir.METRICS), report)
  return report


@dataclasses.dataclass
class TrainedStage:
  """A finished classifier stage, restored for later stages (MM-SHAP, the meta-model)."""
  model: nnx.Module  # In eval mode, with the best checkpoint's weights.
  config: ml_collections.ConfigDict
  tokenizer: TitleTokenizer | None
  class_names: list[str]
  preprocess: input_pipeline.Preprocessor


def load_trained(root: str, stage: ClassifierStage) -> TrainedStage:
  """Rebuilds a stage's model from its saved config and restores its best checkpoint."""
  directory = workdir.stage_dir(root, stage.name)
  config = workdir.read_config(root, stage.name)
  class_names_path = os.path.join(directory, workdir.CLASS_NAMES)
  if not os.path.isfile(class_names_path):
    raise FileNotFoundError(f"{class_names_path} not found: train the {stage.name} stage into "
                            f"{root} first (python train.py --config=configs/{stage.name}.py "
                            f"--workdir={root}).")
  class_names = workdir.read_json(class_names_path)
  tokenizer = (TitleTokenizer.from_folder(directory, max_length=config.data.max_length)
               if stage.uses_text else None)
  model = stage.build_model(config, len(class_names), tokenizer)
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  abstract = checkpoints.abstract(
      {"params": nnx.as_pure(params), "model_state": nnx.as_pure(model_state)},
      parallel.replicated(parallel.make_mesh()))
  best, _ = checkpoints.restore_best(directory, abstract)
  preprocess = make_preprocessor(config, stage, tokenizer)
  return TrainedStage(nnx.merge(graphdef, best["params"], best["model_state"]), config, tokenizer,
                      class_names, preprocess)


def logits_fn(trained: TrainedStage, stage: ClassifierStage, mesh: jax.sharding.Mesh
              ) -> Callable[[input_pipeline.RecordSource, int], dict[str, np.ndarray]]:
  """`(records, batch_size) -> evaluate(...)` of a restored stage on any records (id, title, image,
  label: -1 when unknown): the program and batching the stage evaluated its splits with (flip
  averaging included), so the same products get the same logits. Compiled once per batch shape."""
  graphdef, params, model_state = nnx.split(trained.model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  eval_step = jit_eval_step(graphdef, stage.inputs, mesh,
                            flip_average=bool(trained.config.get("eval_flip_average")),
                            transform=trained.preprocess.photo_transform())
  workers = input_pipeline.worker_count(trained.config.data)

  def logits(source: input_pipeline.RecordSource, batch_size: int) -> dict[str, np.ndarray]:
    return evaluate(eval_step, params, model_state, source, trained.preprocess, batch_size, mesh,
                    workers)

  return logits


# ---------------------------------------------------------------------------------------------------
# The stage.


def export_image_tower(model: nnx.Module, path: str, class_names: list[str]) -> None:
  """The image learner's best model as a Hugging Face folder, for the MMBT's
  `init_from_image=workdir:image/export` and for transformers: a ResNetForImageClassification, or
  the CLIP learner's CLIPVisionModel tower (without its head)."""
  if isinstance(model, clip_vision.CLIPVisionClassifier):
    write = lambda partial: clip_vision.save_pretrained(model.vision, partial)
  else:
    write = lambda partial: resnet.save_pretrained(model, partial, class_names)
  workdir.write_folder_atomically(path, write)


def check_vocabulary(config: ml_collections.ConfigDict, tokenizer: TitleTokenizer) -> None:
  """A pretrained text tower must be fed ids of its own vocabulary (before any work)."""
  model = config.model if config.stage == TEXT.name else config.model.get("bert")
  if not (config.get("init_from") or config.get("init_from_text")) or model is None:
    return
  problem = pretrained.vocabulary_problem(config.stage, tokenizer.vocab_size, model.vocab_size)
  if problem:
    raise config_checks.ConfigError(problem)


def fingerprint(config: ml_collections.ConfigDict, root: str,
                builder: tfds.core.DatasetBuilder | None = None) -> dict[str, Any]:
  """What a classifier (or clip_pretrain) stage is built from: see `workdir.fingerprint`.

  `config` may still hold `workdir:` paths (the main job checks a finished stage with the config
  it was given): they are resolved into `root` before a checkpoint is read for its architecture."""
  config = workdir.resolve_paths(config, root)
  if config.stage in CLASSIFIERS:
    config = effective_config(config)
  builder = builder or builders.builder_for(config.data)
  reads = {stage: workdir.run_of(root, stage)
           for stage in workdir.stages_referenced(config, root)}
  return workdir.fingerprint(config, root, data=builders.identity(builder),
                             class_names=builder.info.features["label"].names, reads=reads)


def run(config: ml_collections.ConfigDict, root: str,
        stage: ClassifierStage) -> dict[str, dict[str, float]]:
  """Trains (or with config.mode='eval' only restores) a classifier stage and writes its outputs."""
  config = effective_config(config)
  directory = workdir.stage_dir(root, stage.name)
  os.makedirs(directory, exist_ok=True)
  mesh = parallel.make_mesh()
  builder = builders.prepare_in_process_order(config.data)
  sources = {split: builders.data_source(builder, split) for split in builders.SPLITS}
  class_names = list(builder.info.features["label"].names)
  # Nothing is resumed or evaluated in a folder built from other inputs.
  workdir.claim(root, stage.name, fingerprint(config, root, builder),
                training=config.mode == "train")
  num_classes = len(class_names)
  tokenizer = (load_or_train_tokenizer(config, directory, sources["train"])
               if stage.uses_text else None)
  if tokenizer is not None:
    check_vocabulary(config, tokenizer)
  preprocess = make_preprocessor(config, stage, tokenizer)

  if workdir.is_writer():
    workdir.write_json(os.path.join(directory, workdir.CLASS_NAMES), class_names)
  model = stage.build_model(config, num_classes, tokenizer)
  model.train()
  train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  del model

  replicated = parallel.replicated(mesh)
  eval_batch_size = config.get("eval_batch_size") or config.batch_size
  parallel.check_batch_size(eval_batch_size, "eval_batch_size")
  eval_step = jit_eval_step(eval_graphdef, stage.inputs, mesh,
                            flip_average=bool(config.get("eval_flip_average")),
                            transform=preprocess.photo_transform())
  workers = input_pipeline.worker_count(config.data)

  def evaluate_split(split: str, params: Any, model_state: Any) -> dict[str, np.ndarray]:
    return evaluate(eval_step, params, model_state, sources[split], preprocess, eval_batch_size, mesh,
                    workers)

  # Validation logits of this run's evaluations by step: the best checkpoint's are not computed
  # a second time for metrics.json (kept on the host; a split's logits are small).
  validated: dict[int, dict[str, np.ndarray]] = {}

  def validate_state(state: dict) -> dict[str, float]:
    evaluated = train_lib.evaluated_model(state)  # The moving average where there is one.
    result = evaluate_split("validation", evaluated["params"], evaluated["model_state"])
    validated.clear()  # Only the newest can be the best one when it improves.
    validated[int(jax.device_get(state["step"]))] = result
    return validation_scores(result, num_classes)

  if config.mode == "train":
    train_lib.fit(
        config, directory, stage.name, params=params, model_state=model_state,
        loss_fn=make_loss(train_graphdef, stage.inputs, config.get("label_smoothing", 0.0)),
        train_source=sources["train"], preprocess=preprocess, evaluate=validate_state,
        selection=SELECTION, best_model=train_lib.evaluated_model, mesh=mesh,
        prepare_batch=preprocess.photo_transform(make_augmentation(config), config.seed).training)

  abstract_model = checkpoints.abstract({"params": params, "model_state": model_state}, replicated)
  best, best_metrics = checkpoints.restore_best(directory, abstract_model)
  logging.info("%s: evaluating the best checkpoint (step %s, validation f1_macro %.4f)", stage.name,
               best_metrics.get("step"), best_metrics.get("f1_macro", float("nan")))
  if stage is IMAGE and workdir.is_writer():
    export_image_tower(nnx.merge(eval_graphdef, best["params"], best["model_state"]),
                       os.path.join(directory, workdir.EXPORT), class_names)
  results = {split: (validated[best_metrics["step"]]
                     if split == "validation" and best_metrics.get("step") in validated
                     else evaluate_split(split, best["params"], best["model_state"]))
             for split in builders.EVAL_SPLITS}
  report = write_outputs(directory, results, class_names, num_classes)
  for split in builders.EVAL_SPLITS:
    logging.info("%s %s: %s", stage.name, split, json.dumps(report[split]))
  return report
