"""Contrastive (CLIP) pretraining of the vision tower on a catalogue's own photo-title pairs.

No pretrained image weights can be downloaded here, and none may exist for a user's domain, but every
product comes with a title: a free caption. The CLIP loss pulls each photo's embedding towards its
own title's and away from the other titles of the batch, so the tower learns what the words name
(article type, colour, pattern) before CLIP-MMBT fine-tunes it on labels.

The text tower is a pretrained BERT (MiniLM by default), *locked* as in LiT (Zhai et al., CVPR 2022):
its mean-pooled title embeddings are computed once per split and only the vision tower, the two
projections and the temperature are trained. Locking keeps the text space that the pretraining
corpus built, and makes a step cost one vision forward and backward, the budget of a CPU.

Stage directory (`{workdir}/clip_pretrain/`):
  export/            the vision tower as a Hugging Face CLIPVisionModel folder (config.json +
                     model.safetensors): what `configs/mmbt.py` loads with `init_from_image`, and
                     what transformers' `CLIPVisionModel.from_pretrained` reads
  checkpoints/, best/    latest train state (resume) and the lowest-validation-loss weights
                     (trained by `train_lib.fit`, the classifier stages' loop, with the CLIP loss)
  title_embeddings_{split}.npz   the locked tower's embeddings, reused by a resumed run
  log.jsonl, loss.png, accuracy.png, metrics.json, config.json
Metrics, over consecutive batches of `batch_size` in split order: the CLIP loss, `accuracy` (a photo
retrieves its own title among the batch's) and `same_label_accuracy` (the retrieved title belongs to
a product of the photo's class: whether the tower learned what the classes look like).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from jmmshap import (builders, checkpoints, classifier, config_checks, input_pipeline, parallel,
                     pretrained, train_lib, workdir)
from jmmshap.models import bert, clip_vision
from jmmshap.tokenizer import TitleTokenizer

STAGE = "clip_pretrain"
SELECTION = train_lib.Selection("loss", higher_is_better=False)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100.


class ContrastiveModel(nnx.Module):
  """The trained half of the pair: vision tower, both projections and the temperature."""

  def __init__(self, vision: clip_vision.CLIPVisionModel, text_size: int, embed_dim: int,
               logit_scale_init: float, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision = vision
    self.visual_projection = nnx.Linear(vision.config.hidden_size, embed_dim, **kw)
    self.text_projection = nnx.Linear(text_size, embed_dim, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, param_dtype))

  def __call__(self, pixel_values: jax.Array, title_embedding: jax.Array) -> jax.Array:
    """(B, B) float32 similarity logits: row i is photo i against every title of the batch."""
    image = self.visual_projection(self.vision(pixel_values)["pooler_output"]).astype(jnp.float32)
    text = self.text_projection(title_embedding).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(self.logit_scale[...].astype(jnp.float32), MAX_LOGIT_SCALE))
    return scale * image @ text.T


def clip_loss(logits: jax.Array) -> jax.Array:
  """Symmetric InfoNCE: each photo's title is its positive, and each title's photo."""
  targets = jnp.arange(logits.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, targets).mean())


def batch_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  retrieved = jnp.argmax(logits, axis=-1)
  return {"loss": clip_loss(logits),
          "accuracy": jnp.mean(retrieved == jnp.arange(logits.shape[0])),
          "same_label_accuracy": jnp.mean(labels[retrieved] == labels)}


def title_embeddings(text_tower: bert.BertModel, source: input_pipeline.RecordSource,
                     tokenizer: TitleTokenizer, batch_size: int, mesh: jax.sharding.Mesh
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mean-pooled last hidden states) for every example of a split, in split order.

  Mean pooling over real tokens is how sentence-transformers' MiniLM was trained to embed sentences.
  """
  preprocess = input_pipeline.Preprocessor(tokenizer, None)

  @nnx.jit
  def embed(tower, batch):
    hidden = tower(batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"])["last_hidden_state"].astype(jnp.float32)
    weights = batch["attention_mask"][..., None].astype(jnp.float32)
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)

  embeddings = np.zeros((len(source), text_tower.config.hidden_size), np.float32)
  ids = np.empty(len(source), dtype=object)
  for batch in input_pipeline.eval_batches(source, preprocess, global_batch_size=batch_size):
    values = np.asarray(jax.device_get(embed(text_tower, parallel.to_global(batch, mesh))))
    real = batch["index"] >= 0
    embeddings[batch["index"][real]] = values[real]
    ids[batch["index"][real]] = batch["id"][real]
  return ids.astype(str), embeddings


def _cached_title_embeddings(directory: str, split: str, compute: Callable[[], tuple]
                             ) -> tuple[np.ndarray, np.ndarray]:
  path = os.path.join(directory, f"title_embeddings_{split}.npz")
  if os.path.isfile(path):
    with np.load(path) as cached:
      return cached["ids"], cached["embeddings"]
  ids, embeddings = compute()
  if workdir.is_writer():
    workdir.write_atomically(path, lambda partial: np.savez(partial, ids=ids, embeddings=embeddings))
  return ids, embeddings


class PairPreprocessor:
  """Images of a batch of records, each with its title's precomputed embedding (looked up by id)."""

  def __init__(self, images: input_pipeline.Preprocessor, ids: np.ndarray, embeddings: np.ndarray):
    self.images = images
    self.row_of_id = {product_id: row for row, product_id in enumerate(ids)}
    if len(self.row_of_id) != len(ids):
      raise ValueError("clip_pretrain: product ids are not unique within a split; the title of a "
                       "photo is looked up by its id.")
    self.embeddings = embeddings

  def __call__(self, records: Sequence[dict]) -> input_pipeline.Batch:
    batch = self.images(records)
    batch["title_embedding"] = self.embeddings[[self.row_of_id[i] for i in batch["id"]]]
    return batch


def build_model(config: ml_collections.ConfigDict, text_size: int) -> ContrastiveModel:
  dtypes = {"dtype": jnp.dtype(config.get("dtype", "float32")), "param_dtype": jnp.float32}
  rngs = nnx.Rngs(params=config.seed)
  vision = clip_vision.CLIPVisionModel(
      clip_vision.CLIPVisionConfig(image_size=config.data.image_size, **config.model.clip.to_dict()),
      rngs=rngs, **dtypes)
  return ContrastiveModel(vision, text_size, config.model.embed_dim, config.model.logit_scale_init,
                          rngs=rngs, **dtypes)


def evaluate(eval_step: Callable, params: Any, source: input_pipeline.RecordSource,
             preprocess: PairPreprocessor, batch_size: int, mesh: jax.sharding.Mesh,
             worker_count: int = 0) -> dict[str, float]:
  """Metrics averaged over the split's consecutive full batches (a retrieval task of fixed size)."""
  num_batches = len(source) // batch_size
  if not num_batches:
    raise ValueError(f"clip_pretrain: the split has {len(source)} examples, fewer than one batch of "
                     f"{batch_size}; lower batch_size.")
  totals = None
  batches = input_pipeline.eval_loader(source, preprocess, global_batch_size=batch_size,
                                       worker_count=worker_count, drop_remainder=True,
                                       transform=lambda batch: parallel.to_global(batch, mesh))
  try:
    for batch in batches:
      values = jax.device_get(eval_step(params, batch))
      totals = values if totals is None else jax.tree.map(np.add, totals, values)
  finally:
    batches.close()
  return {name: float(value) / num_batches for name, value in totals.items()}


def check_config(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  problems: list[str] = []
  config_checks.check_clip_tower(problems, config.model.clip, config.data.image_size, prefix)
  return problems


def pretrained_checkpoints(config: ml_collections.ConfigDict) -> list[pretrained.Checkpoint]:
  """The locked text tower (cut to `text_layers`) and the tokenizer its titles are read with."""
  return [pretrained.Checkpoint(
      "text_tower", "the locked text tower", pretrained.BERT,
      {"num_hidden_layers": config.get("text_layers") or None},
      tokenizer="data.tokenizer" if config.data.get("tokenizer") else "text_tower",
      positions=config.data.max_length)]


def make_loss(graphdef: nnx.GraphDef) -> train_lib.LossFn:
  """The CLIP loss of a batch of photos against their titles' (precomputed) embeddings."""

  def loss_fn(params, model_state, batch):
    del model_state  # The tower has none (no BatchNorm, no dropout).
    logits = nnx.merge(graphdef, params)(batch["pixel_values"], batch["title_embedding"])
    return clip_loss(logits), ({"accuracy": batch_metrics(logits, batch["label"])["accuracy"]}, None)

  return loss_fn


def run(config: ml_collections.ConfigDict, root: str) -> dict[str, dict[str, float]]:
  """Trains (or with config.mode='eval' only restores) the tower, exports it, writes metrics.json."""
  directory = workdir.stage_dir(root, STAGE)
  os.makedirs(directory, exist_ok=True)
  mesh = parallel.make_mesh()
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  parallel.check_batch_size(config.batch_size)
  builder = builders.prepare_in_process_order(config.data)
  splits = builders.SPLITS
  sources = {split: builders.data_source(builder, split) for split in splits}
  workdir.claim(root, STAGE, classifier.fingerprint(config, root, builder),
                training=config.mode == "train")

  tokenizer = TitleTokenizer.from_folder(config.data.get("tokenizer") or config.text_tower,
                                         max_length=config.data.max_length)
  text_tower = None
  pairs = {}
  images = input_pipeline.Preprocessor(None, config.data.image_size, config.data.image_mean,
                                       config.data.image_std)
  for split in splits:
    def compute(split=split):
      nonlocal text_tower
      if text_tower is None:
        text_tower = bert.encoder_from_pretrained(config.text_tower, config.text_layers)
      logging.info("clip_pretrain: embedding the %s titles with the locked text tower", split)
      return title_embeddings(text_tower, sources[split], tokenizer, config.eval_batch_size, mesh)
    ids, embeddings = _cached_title_embeddings(directory, split, compute)
    pairs[split] = PairPreprocessor(images, ids, embeddings)
  text_size = pairs["train"].embeddings.shape[-1]
  del text_tower

  model = build_model(config, text_size)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)

  transform = images.photo_transform()
  workers = input_pipeline.worker_count(config.data)

  def eval_step(params, batch):
    batch = transform.evaluation(batch)
    logits = nnx.merge(graphdef, params)(batch["pixel_values"], batch["title_embedding"])
    return batch_metrics(logits, batch["label"])

  eval_step = jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  def evaluate_split(split: str, params: Any) -> dict[str, float]:
    return evaluate(eval_step, params, sources[split], pairs[split], config.batch_size, mesh,
                    workers)

  if config.mode == "train":
    train_lib.fit(
        config, directory, STAGE, params=params, model_state=None, loss_fn=make_loss(graphdef),
        train_source=sources["train"], preprocess=pairs["train"],
        prepare_batch=transform.training,
        evaluate=lambda state: evaluate_split("validation",
                                              train_lib.evaluated_model(state)["params"]),
        selection=SELECTION,
        best_model=lambda state: {"params": train_lib.evaluated_model(state)["params"]}, mesh=mesh)

  best, best_metrics = checkpoints.restore_best(
      directory, checkpoints.abstract({"params": params}, replicated))
  logging.info("clip_pretrain: best checkpoint at step %s (validation loss %.4f)",
               best_metrics.get("step"), best_metrics.get("loss", float("nan")))
  report = {split: evaluate_split(split, best["params"]) for split in builders.EVAL_SPLITS}
  if workdir.is_writer():
    trained = nnx.merge(graphdef, best["params"])
    workdir.write_folder_atomically(os.path.join(directory, workdir.EXPORT),
                                    lambda partial: clip_vision.save_pretrained(trained.vision, partial))
    workdir.write_json(os.path.join(directory, workdir.METRICS), report)
  for split, values in report.items():
    logging.info("clip_pretrain %s: %s", split, json.dumps(values))
  return report
