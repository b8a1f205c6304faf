"""MM-SHAP's players, shares and game values, whatever the model.

An example's players are its text players, then its image players, in slots 0 .. p - 1 of a player
axis padded to a fixed width P. Text players are words (tokens sharing a tokenizer word id,
`'words'`) or runs of tokens (`'tokens'`); special and padding tokens are never players. Image
players are a model's image embeddings (the MMBT's) or a grid of pixel patches (`patch_map`, any
model), whose size follows the MM-SHAP authors' rule: about as many image players as text tokens.

    T-SHAP = sum|phi_text| / (sum|phi_text| + sum|phi_image|),   V-SHAP = 1 - T-SHAP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TEXT, IMAGE, NO_PLAYER = 0, 1, -1  # player_modality codes.
TEXT_GROUPINGS = ("words", "tokens")
VALUES = ("logit", "log_prob", "log_odds", "contrast")


# --------------------------------------------------------------------------------------------------
# Players.


def text_players(word_ids: np.ndarray, *, grouping: str = "words", tokens_per_player: int = 1,
                 max_text_players: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Text players of each example: `player_of_token` (B, L) and `num_text_players` (B,).

  word_ids (B, L) come from the tokenizer, -1 on [CLS]/[SEP]/[PAD]; those tokens get player -1 (never
  a player, always kept). 'words' makes each word a player, in title order; 'tokens' makes each run of
  `tokens_per_player` tokens one. With `max_text_players` > 0 the players past the limit are merged
  into the last one, so every token still belongs to a player.
  """
  if grouping not in TEXT_GROUPINGS:
    raise ValueError(f"grouping={grouping!r}; use one of {TEXT_GROUPINGS}.")
  word_ids = np.asarray(word_ids)
  if word_ids.ndim != 2:
    raise ValueError(f"word_ids has shape {word_ids.shape}; expected (batch, length).")
  player_of_token = np.full(word_ids.shape, NO_PLAYER, np.int32)
  num_text_players = np.zeros(word_ids.shape[0], np.int32)
  for row, ids in enumerate(word_ids):
    real = ids >= 0
    if grouping == "words":
      players = np.unique(ids[real], return_inverse=True)[1].reshape(-1)
    else:
      players = np.arange(int(real.sum())) // tokens_per_player
    if max_text_players:
      players = np.minimum(players, max_text_players - 1)
    player_of_token[row, real] = players
    num_text_players[row] = players.max() + 1 if players.size else 0
  return player_of_token, num_text_players


def word_ids_of(encoding: Any) -> np.ndarray:
  """(B, L) word ids of a Hugging Face tokenizer's batch output, -1 on special and padding tokens:
  what `text_players` reads, for a model whose tokenizer is not a TitleTokenizer."""
  return np.asarray([[-1 if word is None else word for word in encoding.word_ids(row)]
                     for row in range(len(encoding["input_ids"]))], np.int32)


def text_slots(length: int, options: Any) -> int:
  """Text player slots for inputs of `length` tokens: the most any example of that length can have
  (`options`: its text_players, tokens_per_player and max_text_players, e.g. mmshap.Options)."""
  slots = length if options.text_players == "words" else -(-length // options.tokens_per_player)
  return min(slots, options.max_text_players) if options.max_text_players else slots


def check_players(player_of_token: np.ndarray, num_text_players: np.ndarray, num_slots: int,
                  ids: Sequence[str]) -> None:
  """Every text player owns a token, no token names a player the example lacks, and all fit."""
  for row, (players, count) in enumerate(zip(player_of_token, num_text_players)):
    owned = np.unique(players[players >= 0])
    if count > num_slots:
      raise ValueError(f"example {ids[row]!r} has {count} text players but there are {num_slots} "
                       "text player slots; raise max_text_players or let it be 0 (no limit).")
    if owned.size and owned[-1] >= count:
      raise ValueError(f"example {ids[row]!r}: a token belongs to text player {owned[-1]} but the "
                       f"example has {count} text players (player_of_token and num_text_players "
                       "disagree).")
    if owned.size != count:
      missing = sorted(set(range(count)) - set(owned.tolist()))
      raise ValueError(f"example {ids[row]!r} has {count} text players but players {missing} own no "
                       "token (player_of_token and num_text_players disagree).")


def player_modality(num_text_players: np.ndarray, num_image_players: np.ndarray | int,
                    num_slots: int) -> np.ndarray:
  """(B, P): TEXT on slots 0 .. t - 1, IMAGE on the next n (per example, or the same for all),
  NO_PLAYER after."""
  slots = np.arange(num_slots)[None]
  text = np.asarray(num_text_players)[:, None]
  image = np.broadcast_to(np.asarray(num_image_players), text.shape[:1])[:, None]
  return np.where(slots < text, TEXT,
                  np.where(slots < text + image, IMAGE, NO_PLAYER)).astype(np.int8)


def modality_shares(phi: np.ndarray, modality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """T-SHAP and V-SHAP (..., ) from phi and player_modality (..., P); NaN where every phi is 0."""
  magnitude = np.abs(np.where(modality == NO_PLAYER, 0.0, np.asarray(phi, np.float64)))
  text = np.sum(np.where(modality == TEXT, magnitude, 0.0), axis=-1)
  image = np.sum(np.where(modality == IMAGE, magnitude, 0.0), axis=-1)
  total = text + image
  defined = total > 0
  safe_total = np.where(defined, total, 1.0)
  return np.where(defined, text / safe_total, np.nan), np.where(defined, image / safe_total, np.nan)


def authors_grid(num_tokens: int) -> int:
  """The patch grid of MM-SHAP's authors: ceil(sqrt(text tokens)) a side, so that the image has
  about as many players as the text has tokens (its special tokens counted)."""
  return max(1, math.ceil(math.sqrt(num_tokens)))


def patch_map(height: int, width: int, grid: int) -> np.ndarray:
  """(H, W) int32: the patch (row-major, 0 .. grid**2 - 1) of each pixel, as MM-SHAP's authors cut
  the image: square cells of `height // grid` by `width // grid` pixels from the top-left corner; the
  pixels of the last rows and columns that do not fill a cell (-1) belong to no patch and are never
  masked."""
  if not 1 <= grid <= min(height, width):
    raise ValueError(f"a {grid}x{grid} patch grid does not fit a {height}x{width} image.")
  cell_h, cell_w = height // grid, width // grid
  rows, cols = np.arange(height) // cell_h, np.arange(width) // cell_w
  inside = (rows[:, None] < grid) & (cols[None, :] < grid)
  return np.where(inside, rows[:, None] * grid + cols[None, :], -1).astype(np.int32)


def patch_boxes(height: int, width: int, grid: int) -> list[tuple[float, float, float, float]]:
  """The (top, left, bottom, right) photo fractions of each patch of `patch_map`, row-major."""
  patch_map(height, width, grid)  # Checks that the grid fits.
  cell_h, cell_w = height // grid, width // grid
  return [(r * cell_h / height, c * cell_w / width, (r + 1) * cell_h / height,
           (c + 1) * cell_w / width) for r in range(grid) for c in range(grid)]


# --------------------------------------------------------------------------------------------------
# Values.


def class_values(logits: jax.Array, value: str) -> jax.Array:
  """(K, C) game value of every class from the logits (K, C) of K coalitions.

  'log_odds' is log(p_c / (1 - p_c)) = z_c - logsumexp_{j != c} z_j, taken per class over the
  other logits directly, so it stays exact where p_c rounds to 1. 'contrast' is combined on the
  host (`contrast_weights`), so its rows are the logits.
  """
  if value == "log_prob":
    return jax.nn.log_softmax(logits, axis=-1)
  if value == "log_odds":
    num_classes = logits.shape[-1]
    others = jnp.where(jnp.eye(num_classes, dtype=bool), -jnp.inf, logits[..., None, :])
    return logits - jax.nn.logsumexp(others, axis=-1)
  return logits


def contrast_weights(full_logits: np.ndarray, target: int) -> np.ndarray:
  """Weights w (C,) of the 'contrast' value w . z = z_target - sum_{j != target} q_j z_j.

  q is the full input's softmax over the classes other than the target: the rivals the model
  weighed for this example. Evidence that raises the target together with those rivals (e.g. that
  narrows the catalogue to a family of similar classes) cancels, so the game credits what separates
  the target from its rivals: "why this class rather than the ones it was confused with". q is fixed
  per example, so the value is linear in the logits and its Shapley values are the same
  combination of the classes' logit Shapley values.
  """
  full_logits = np.asarray(full_logits, np.float64)
  others = np.arange(full_logits.shape[-1]) != target
  rivals = full_logits[others] - full_logits[others].max()
  weights = np.zeros_like(full_logits)
  weights[others] = -np.exp(rivals) / np.exp(rivals).sum()
  weights[target] = 1.0
  return weights
