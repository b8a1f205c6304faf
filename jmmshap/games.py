"""MM-SHAP games: how a coalition of players becomes one row of a model's input, and its value.

The explainer (`mmshap.Explainer`) packs the coalitions of many examples into rows; a game turns
each row (an example and a mask over its players) into the model's input, runs the model, and
returns every class's value. Two kinds:

  * `EmbeddingGame`: the CLIP-MMBT with its N pooled image embeddings as the image players. The
    vision tower runs once per example (`prepare`); a coalition zeroes (or hides) the embeddings it
    lacks and runs only the BERT part. Cheap, and specific to the MMBT.
  * `PatchGame`: any JAX model `scores(model, input_ids, attention_mask, pixel_values) -> (B, C)`,
    with a grid of pixel patches as the image players, as MM-SHAP's authors define them: a patch a
    coalition lacks is filled with `fill` in the model's input space (0, as in the authors' code,
    i.e. the dataset mean once the pixels are normalised), and the whole model, vision tower
    included, runs per coalition. The grid follows the authors' rule (`players.authors_grid`: about
    as many image players as text tokens) unless fixed. `mmbt_patch_game` and `clip_match_game`
    (CLIP's image-sentence score, the authors' own setting) are two callers.

A text player the coalition lacks becomes `mask_token_id` ("token" masking) or leaves the
attention ("attention" masking). Programs are compiled once per model structure and input shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmmshap import players
from jmmshap.models import clip as clip_lib
from jmmshap.models import mmbt as mmbt_lib

TEXT_MASKINGS = ("token", "attention")
# The default bound of a patch row's memory when a game is not told its model's (bytes).
UNKNOWN_ROW_BYTES = 64 * 2**20


def transformer_row_bytes(hidden: int, intermediate: int, heads: int, positions: int) -> int:
  """A rough bound on one input's activations in a transformer forward (no gradients): per position
  its hidden states, query, key and value, the MLP's intermediate and every head's attention row,
  in float32, times 4 for XLA's buffers. At BERT-base size and 128 tokens: 15 MB, as measured."""
  return 16 * positions * (4 * hidden + intermediate + heads * positions)


def row_bytes(model: mmbt_lib.MMBT, length: int) -> int:
  """One embedding-game row of an MMBT: its BERT over [CLS] img x N [SEP] and `length` tokens."""
  text = model.bert.config
  return transformer_row_bytes(text.hidden_size, text.intermediate_size, text.num_attention_heads,
                               length + model.config.num_image_embeddings + 2)


def with_masking(model: mmbt_lib.MMBT, text_masking: str | None = None,
                 image_masking: str | None = None) -> mmbt_lib.MMBT:
  """The model with another masked-player representation (None keeps the trained one), in place."""
  changes = {k: v for k, v in (("text_masking", text_masking), ("image_masking", image_masking))
             if v is not None}
  if changes:
    model.config = dataclasses.replace(model.config, **changes)  # Validated by MMBTConfig.
  return model


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, Any, list[jax.Array]]:
  """The model in eval mode (a copy), as graph, tree structure and flat state arrays."""
  evaluated = nnx.merge(*nnx.split(model))
  evaluated.eval()
  graphdef, state = nnx.split(evaluated)
  leaves, treedef = jax.tree.flatten(state)
  return graphdef, treedef, leaves


def _merge(graphdef: nnx.GraphDef, treedef: Any, leaves: list[jax.Array]) -> nnx.Module:
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _check_value(value: str) -> str:
  played = tuple(v for v in players.VALUES if v != "contrast")
  if value not in played:
    raise ValueError(f"a game's value={value!r}; use one of {played} ('contrast' is played as "
                     "'logit' and combined by the explainer: options.value='contrast').")
  return value


def _text_keep(rows: Callable[[str], jax.Array], masks: jax.Array) -> jax.Array:
  """(K, L): a token is kept unless it belongs to a text player the row's coalition lacks."""
  player_of_token = rows("player_of_token")
  return (player_of_token < 0) | jnp.take_along_axis(masks, jnp.maximum(player_of_token, 0), axis=1)


class Game:
  """What the explainer needs of a game (see the module docstring)."""
  leaves: list[jax.Array]  # The model's state, flat: replicated by the explainer.
  value: str  # What a row returns per class (players.VALUES; 'contrast' plays 'logit').
  image_input: str  # The batch field of the images: "pixel_values" or "image_features".

  def image_slots(self, length: int) -> int:
    """Image player slots for inputs of `length` tokens: the most any example can have."""
    raise NotImplementedError

  def image_players(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B,) image players of each example."""
    raise NotImplementedError

  def prepare(self, leaves: list[jax.Array], group: dict[str, Any],
              put_rows: Callable[[np.ndarray], jax.Array]) -> dict[str, Any]:
    """Per-group work before the coalitions (host arrays in, arrays the values program reads out)."""
    return group

  def values(self, leaves: list[jax.Array], group: Mapping[str, jax.Array],
             row_example: jax.Array, masks: jax.Array) -> jax.Array:
    """(K, C): the value of every class for K coalition rows."""
    raise NotImplementedError

  def row_bytes(self, length: int) -> int:
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# The MMBT's image embeddings as players.


# The model state is passed as its flat list of arrays: a static graphdef argument would be hashed,
# and an nnx.State flattened, on every call, which cost ~10 ms per call even for a tiny model.
@functools.lru_cache(maxsize=16)
def _image_program(graphdef: nnx.GraphDef, treedef: Any) -> Callable:
  return jax.jit(lambda leaves, pixel_values: _merge(graphdef, treedef, leaves).image_features(
      pixel_values))


@functools.lru_cache(maxsize=16)
def _embedding_program(graphdef: nnx.GraphDef, treedef: Any, value: str) -> Callable:

  @jax.jit
  def coalition_values(leaves, group, row_example, masks):
    rows = lambda name: jnp.take(group[name], row_example, axis=0)
    image_features = rows("image_features")
    image_slots = rows("num_text_players")[:, None] + jnp.arange(image_features.shape[1])
    image_keep = jnp.take_along_axis(masks, image_slots, axis=1)
    model = _merge(graphdef, treedef, leaves)
    logits = model(rows("input_ids"), rows("attention_mask"), rows("token_type_ids"),
                   image_features=image_features, text_keep=_text_keep(rows, masks),
                   image_keep=image_keep)["logits"].astype(jnp.float32)
    return players.class_values(logits, value)

  return coalition_values


class EmbeddingGame(Game):
  """The MMBT's N image embeddings are the image players; masking as its config says."""
  image_input = "pixel_values"

  def __init__(self, model: mmbt_lib.MMBT, value: str = "logit"):
    self.graphdef, self.treedef, self.leaves = _split(model)
    self.model, self.value = model, _check_value(value)
    self.num_images = model.config.num_image_embeddings
    self._values = _embedding_program(self.graphdef, self.treedef, value)

  def image_slots(self, length: int) -> int:
    return self.num_images

  def image_players(self, inputs):
    return np.full(len(inputs["input_ids"]), self.num_images, np.int32)

  def prepare(self, leaves, group, put_rows):
    if "pixel_values" in group:
      features = _image_program(self.graphdef, self.treedef)(leaves,
                                                             put_rows(group.pop("pixel_values")))
      group["image_features"] = features
    count = np.shape(group["image_features"])[1]  # A global array when several processes run.
    if count != self.num_images:
      raise ValueError(f"image_features has {count} embeddings per example, the model "
                       f"{self.num_images}.")
    return group

  def values(self, leaves, group, row_example, masks):
    return self._values(leaves, group, row_example, masks)

  def row_bytes(self, length):
    return row_bytes(self.model, length)


# --------------------------------------------------------------------------------------------------
# Pixel patches as players, for any model.


@functools.lru_cache(maxsize=16)
def _patch_program(graphdef: nnx.GraphDef, treedef: Any, scores: Callable, value: str,
                   text_masking: str, mask_token_id: int | None, fill: float) -> Callable:

  @jax.jit
  def coalition_values(leaves, group, row_example, masks):
    rows = lambda name: jnp.take(group[name], row_example, axis=0)
    text_keep = _text_keep(rows, masks)
    input_ids, attention_mask = rows("input_ids"), rows("attention_mask")
    if text_masking == "token":
      input_ids = jnp.where(text_keep, input_ids, mask_token_id)
    else:
      attention_mask = attention_mask * text_keep.astype(attention_mask.dtype)
    patch = rows("patch_of_pixel")  # (K, H, W): the patch of each pixel, -1 for none.
    slot = rows("num_text_players")[:, None, None] + jnp.maximum(patch, 0)
    present = jnp.take_along_axis(masks, slot.reshape(len(masks), -1), axis=1).reshape(patch.shape)
    keep = (patch < 0) | present
    pixels = rows("pixel_values")
    pixels = jnp.where(keep[..., None], pixels, jnp.asarray(fill, pixels.dtype))
    model = _merge(graphdef, treedef, leaves)
    scored = scores(model, input_ids, attention_mask, pixels).astype(jnp.float32)
    return players.class_values(scored.reshape(len(masks), -1), value)

  return coalition_values


class PatchGame(Game):
  """A grid of pixel patches as the image players of any model (see the module docstring).

  scores(model, input_ids, attention_mask, pixel_values) -> (B, C) is called with `model` rebuilt
  from its state inside the compiled program; it must be a module-level (hashable) function.
  grid: patches a side, the same for every example; 0: the authors' rule per example.
  """
  image_input = "pixel_values"

  def __init__(self, model: nnx.Module, scores: Callable, *, mask_token_id: int | None = None,
               text_masking: str = "token", grid: int = 0, fill: float = 0.0,
               value: str = "logit", row_bytes_fn: Callable[[int], int] | None = None):
    if text_masking not in TEXT_MASKINGS:
      raise ValueError(f"text_masking={text_masking!r}; use one of {TEXT_MASKINGS}.")
    if text_masking == "token" and mask_token_id is None:
      raise ValueError("token masking needs the mask_token_id a masked text token becomes.")
    if grid < 0:
      raise ValueError(f"grid={grid}: patches a side must be positive (0: the authors' rule).")
    self.graphdef, self.treedef, self.leaves = _split(model)
    self.grid, self.fill, self.value = grid, fill, _check_value(value)
    self._row_bytes = row_bytes_fn
    self._values = _patch_program(self.graphdef, self.treedef, scores, value, text_masking,
                                  mask_token_id, float(fill))

  def _grids(self, attention_mask: np.ndarray) -> np.ndarray:
    tokens = np.asarray(attention_mask).sum(axis=1)
    return np.asarray([self.grid or players.authors_grid(int(n)) for n in tokens], np.int32)

  def image_slots(self, length: int) -> int:
    return (self.grid or players.authors_grid(length)) ** 2

  def image_players(self, inputs):
    return self._grids(inputs["attention_mask"]) ** 2

  def prepare(self, leaves, group, put_rows):
    height, width = np.asarray(group["pixel_values"]).shape[1:3]
    group["patch_of_pixel"] = np.stack([players.patch_map(height, width, int(grid))
                                        for grid in self._grids(group["attention_mask"])])
    return group

  def values(self, leaves, group, row_example, masks):
    return self._values(leaves, group, row_example, masks)

  def row_bytes(self, length):
    return self._row_bytes(length) if self._row_bytes else UNKNOWN_ROW_BYTES


def _mmbt_scores(model: mmbt_lib.MMBT, input_ids, attention_mask, pixel_values):
  return model(input_ids, attention_mask, None, pixel_values)["logits"]


def _vision_row_bytes(config: Any, image_size: int) -> int:
  return transformer_row_bytes(config.hidden_size, config.intermediate_size,
                               config.num_attention_heads, (image_size // config.patch_size) ** 2 + 1)


def mmbt_patch_game(model: mmbt_lib.MMBT, *, value: str = "logit", grid: int = 0,
                    fill: float = 0.0) -> PatchGame:
  """The MMBT's classes explained with pixel patches: its whole forward per coalition; text players
  masked as its config says ([MASK] or out of attention)."""
  vision = model.vision.config
  image_size = getattr(vision, "image_size", 224)
  text_row = lambda length: row_bytes(model, length)
  vision_row = (_vision_row_bytes(vision, image_size) if hasattr(vision, "patch_size")
                else UNKNOWN_ROW_BYTES)
  masking = "token" if model.config.text_masking == "mask_token" else "attention"
  return PatchGame(model, _mmbt_scores, mask_token_id=model.config.mask_token_id,
                   text_masking=masking, grid=grid, fill=fill, value=value,
                   row_bytes_fn=lambda length: text_row(length) + vision_row)


def _clip_scores(model: clip_lib.CLIPModel, input_ids, attention_mask, pixel_values):
  return model.match_scores(input_ids, attention_mask, pixel_values)


def clip_match_game(model: clip_lib.CLIPModel, *, mask_token_id: int = 0, grid: int = 0,
                    fill: float = 0.0, value: str = "logit") -> PatchGame:
  """CLIP's image-sentence score (exp(logit_scale) * cosine) explained as MM-SHAP's authors do: a
  masked text token becomes `mask_token_id` (0 in their code), a masked patch `fill`."""
  text, vision = model.config.text, model.config.vision

  def row(length: int) -> int:
    return (transformer_row_bytes(text.hidden_size, text.intermediate_size,
                                  text.num_attention_heads, length)
            + _vision_row_bytes(vision, vision.image_size))

  return PatchGame(model, _clip_scores, mask_token_id=mask_token_id, grid=grid, fill=fill,
                   value=value, row_bytes_fn=row)
