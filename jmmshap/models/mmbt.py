"""CLIP-MMBT: image embeddings from a vision tower placed into BERT's token sequence next to the text.

As in the original MMBT (Kiela et al., 2019), the vision tower's feature grid is average-pooled into N
image embeddings (N from the pooling table, 4 by default), each mapped linearly to BERT's width, and
the encoder reads

    [CLS] img_1 .. img_N [SEP] w_1 .. w_k [SEP] [PAD] ..

The image segment shares BERT's word ([CLS], [SEP]), position and token-type tables and its LayerNorm;
it has positions 0..N+1 and token type 1, while the text keeps the positions and token type 0 it has in
a plain BERT input (its own leading [CLS] is dropped), so a pretrained BERT sees familiar text. The
classifier reads the pooled output of the first [CLS].

For MM-SHAP the forward takes keep-masks over the text tokens and over the N image embeddings, and can
take precomputed `image_features`, so the vision tower runs once per example and only the BERT part
runs per coalition. How a masked player is represented is `MMBTConfig.text_masking` /
`image_masking`:
  text  "mask_token": the token id becomes [MASK] (default; the input keeps its length and positions)
        "attention":  the token is removed from attention
  image "zero":       the projected image embedding becomes the zero vector (default; position and
                      token-type embeddings remain, so the model still sees an image slot, empty)
        "attention":  the image embedding is removed from attention
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jmmshap.models import bert as bert_lib
from jmmshap.models import clip_vision, resnet

Array = jax.Array

# N image embeddings -> (rows, columns) of the pooling grid, as in the original MMBT.
POOLING_GRIDS = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 6: (3, 2), 8: (4, 2), 9: (3, 3)}
TEXT_MASKINGS = ("mask_token", "attention")
IMAGE_MASKINGS = ("zero", "attention")
IMAGE_TOKEN_TYPE = 1


@dataclasses.dataclass(frozen=True)
class MMBTConfig:
  num_image_embeddings: int = 4
  cls_token_id: int = 101
  sep_token_id: int = 102
  mask_token_id: int = 103
  text_masking: str = "mask_token"
  image_masking: str = "zero"
  classifier_dropout: float = 0.1

  def __post_init__(self):
    if self.num_image_embeddings not in POOLING_GRIDS:
      raise ValueError(f"MMBT: num_image_embeddings={self.num_image_embeddings} is not in the pooling "
                       f"table; use one of {sorted(POOLING_GRIDS)}.")
    if self.text_masking not in TEXT_MASKINGS:
      raise ValueError(f"MMBT: text_masking={self.text_masking!r}; use one of {TEXT_MASKINGS}.")
    if self.image_masking not in IMAGE_MASKINGS:
      raise ValueError(f"MMBT: image_masking={self.image_masking!r}; use one of {IMAGE_MASKINGS}.")


def adaptive_average_pool(features: Array, grid: tuple[int, int]) -> Array:
  """(B, H, W, C) -> (B, rows * cols, C), bins as torch's AdaptiveAvgPool2d (row-major order)."""
  _, height, width, _ = features.shape
  rows, cols = grid

  def bins(size, count):
    return [(i * size // count, -(-(i + 1) * size // count)) for i in range(count)]

  pooled = [jnp.mean(features[:, r0:r1, c0:c1], axis=(1, 2), dtype=jnp.float32)
            for r0, r1 in bins(height, rows) for c0, c1 in bins(width, cols)]
  return jnp.stack(pooled, axis=1).astype(features.dtype)


class MMBT(nnx.Module):
  """BERT over [CLS] image embeddings [SEP] + text, with a classification head."""

  def __init__(self, config: MMBTConfig, text: bert_lib.BertModel,
               vision: clip_vision.CLIPVisionModel | resnet.ResNet, num_labels: int, *,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """`text` and `vision` are built (or imported from checkpoints) by the caller."""
    if text.pooler is None:
      raise ValueError("MMBT: the text model needs its pooler (BertModel(add_pooling_layer=True)).")
    max_positions = text.config.max_position_embeddings
    if config.num_image_embeddings + 2 > max_positions:
      raise ValueError(f"MMBT: {config.num_image_embeddings} image embeddings need "
                       f"{config.num_image_embeddings + 2} positions, BERT has {max_positions}.")
    self.config = config
    self.vision = vision
    if isinstance(vision, clip_vision.CLIPVisionModel):
      vision_width = vision.config.hidden_size
    elif isinstance(vision, resnet.ResNet):
      vision_width = vision.config.hidden_sizes[-1]
    else:
      raise TypeError(f"MMBT: the vision tower must be a CLIPVisionModel or a ResNet, got "
                      f"{type(vision).__name__}.")
    hidden_size = text.config.hidden_size
    self.projection = nnx.Linear(vision_width, hidden_size, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.bert = text
    self.dropout = nnx.Dropout(config.classifier_dropout, rngs=rngs)
    self.classifier = nnx.Linear(hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)

  def image_features(self, pixel_values: Array) -> Array:
    """(B, N, D_vision): the vision tower's feature grid pooled into N embeddings (not projected)."""
    outputs = self.vision(pixel_values)
    features = outputs["last_hidden_state"]
    if isinstance(self.vision, clip_vision.CLIPVisionModel):
      patches = features[:, 1:]  # Drop the class token; patches are row-major.
      rows = pixel_values.shape[1] // self.vision.config.patch_size
      features = patches.reshape(patches.shape[0], rows, -1, patches.shape[-1])
    return adaptive_average_pool(features, POOLING_GRIDS[self.config.num_image_embeddings])

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               pixel_values: Array | None = None, *, image_features: Array | None = None,
               text_keep: Array | None = None, image_keep: Array | None = None) -> dict[str, Array]:
    """`logits` (B, C) plus BERT's `last_hidden_state` and `pooler_output` over the joint sequence.

    input_ids, attention_mask, token_type_ids: (B, L) tokenizer output, starting with [CLS].
    pixel_values (B, H, W, 3) or image_features (B, N, D_vision) from `image_features`.
    text_keep (B, L) and image_keep (B, N): False marks a masked player (see the module docstring).
    """
    config = self.config
    if (pixel_values is None) == (image_features is None):
      raise ValueError("MMBT: pass exactly one of pixel_values or image_features.")
    if image_features is None:
      image_features = self.image_features(pixel_values)
    batch, num_images = image_features.shape[:2]
    if num_images != config.num_image_embeddings:
      raise ValueError(f"MMBT: image_features has {num_images} embeddings, the model "
                       f"{config.num_image_embeddings}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    image_attention = jnp.ones((batch, num_images), jnp.int32)
    if text_keep is not None:
      if config.text_masking == "mask_token":
        input_ids = jnp.where(text_keep, input_ids, config.mask_token_id)
      else:
        attention_mask = attention_mask * text_keep.astype(jnp.int32)
    images = self.projection(image_features)
    if image_keep is not None:
      if config.image_masking == "zero":
        images = images * image_keep[..., None].astype(images.dtype)
      else:
        image_attention = image_keep.astype(jnp.int32)

    words = self.bert.embeddings.word_embeddings
    cls = jnp.broadcast_to(words(jnp.asarray([config.cls_token_id])), (batch, 1, images.shape[-1]))
    sep = jnp.broadcast_to(words(jnp.asarray([config.sep_token_id])), (batch, 1, images.shape[-1]))
    text_ids = input_ids[:, 1:]  # The text's own [CLS] is replaced by the image segment's.
    inputs_embeds = jnp.concatenate(
        [cls.astype(images.dtype), images, sep.astype(images.dtype),
         words(text_ids).astype(images.dtype)], axis=1)
    length = input_ids.shape[1]
    position_ids = jnp.concatenate([jnp.arange(num_images + 2), jnp.arange(1, length)])[None]
    segment_ids = jnp.concatenate(
        [jnp.full((batch, num_images + 2), IMAGE_TOKEN_TYPE, token_type_ids.dtype),
         token_type_ids[:, 1:]], axis=1)
    joint_attention = jnp.concatenate(
        [jnp.ones((batch, 1), jnp.int32), image_attention, jnp.ones((batch, 1), jnp.int32),
         attention_mask[:, 1:]], axis=1)
    outputs = self.bert(attention_mask=joint_attention, token_type_ids=segment_ids,
                        inputs_embeds=inputs_embeds, position_ids=position_ids)
    logits = self.classifier(self.dropout(outputs["pooler_output"]))
    return {**outputs, "logits": logits.astype(jnp.float32)}
