"""MM-SHAP: how much of a prediction comes from the title and how much from the photo.

MM-SHAP (Parcalabescu and Frank, 2023) makes the inputs of both modalities players of one cooperative
game whose value is the model's output for the explained class, and reads each modality's share of
the Shapley values' absolute mass:

    T-SHAP = sum|phi_text| / (sum|phi_text| + sum|phi_image|),   V-SHAP = 1 - T-SHAP.

When every phi is 0 (the value depends on no player) both shares are 0/0: they are NaN, and the
summaries count such examples (`num_undefined`) instead of averaging them.

Players (`players.py`). Text players are words (tokens that share a tokenizer word id,
`text_players='words'`) or runs of `tokens_per_player` tokens ('tokens'); special and padding tokens
are never players and are always kept. A title with more words (or runs) than `max_text_players`
loses no token: its trailing words are merged into the last text player. Image players are, for the
CLIP-MMBT, its N image embeddings (`image_players='embeddings'`, masked as its
`MMBTConfig.image_masking` says; the vision tower runs once per example) or a grid of pixel patches
('patches', MM-SHAP's authors' players: filled with `patch_fill` and the whole model run per
coalition); any other model is played through a `games.PatchGame`. An example's players are its
text players, then its image players. How a game turns a coalition into the model's input is
`games.py`.

One compiled program for every title length. The number of players p differs per example, and any
shape that follows p would compile once per p. Instead the player axis is padded to a fixed width P
(text slots + image slots, the most any example of that length can have): an example's real players
fill slots 0 .. p - 1 and the rest are dummies that no coalition ever contains. A forward call takes
a fixed-size chunk of coalition rows, each an example slot plus a mask over the P slots, and maps
players to tokens through traced per-example arrays (`player_of_token`, `num_text_players`). Exact
examples enumerate only their own 2**p coalitions, packed back to back across the examples of a
group, so small games share chunks; the rows are sharded over the `data` mesh axis.

Values. Each row returns the model's output for every class (logits, log-probabilities with
`value='log_prob'`, or log-odds with `value='log_odds'`). An example's coalitions run from the full
one down to the empty one, so its first chunk gives the prediction on the full input and fixes the
explained class (by default that prediction); only that class's 2**p values are kept, and reduced on
the host in float64 by `shapley.shapley_from_values`. `value='contrast'` keeps instead a fixed
combination of every class's logits, `contrast_weights`: the target against the rivals the model
weighed on the full input. Above `max_exact_players` players the values are estimated by
KernelSHAP through `shapley.shapley` with the same compiled forward (only the sampler's small mask
programs compile per p); sampled examples run one at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jmmshap import games, input_pipeline, parallel, shapley
from jmmshap.models import mmbt as mmbt_lib
# The players' vocabulary is part of this module's API (tests, the stage and scripts use it here).
from jmmshap.players import (IMAGE, NO_PLAYER, TEXT, TEXT_GROUPINGS, VALUES,  # noqa: F401
                             check_players, class_values, contrast_weights, modality_shares,
                             player_modality, text_players, text_slots)
from jmmshap.tokenizer import TitleTokenizer

IMAGE_PLAYERS = ("embeddings", "patches")

TARGETS = ("predicted", "label")
METHODS = ("auto", "exact", "kernel", "permutation")


@dataclasses.dataclass(frozen=True)
class Options:
  """How MM-SHAP is computed; see the module docstring.

  method: 'auto' (exact up to max_exact_players players, KernelSHAP above), 'exact' (every example
    exact; above shapley.MAX_EXACT_PLAYERS it fails with the engine's error), 'kernel' or
    'permutation' (every example sampled).
  budget: value evaluations per sampled example (0: `shapley.default_budget(p)`).
  chunk_size: the most coalition rows per forward call, a multiple of the device count (0: the
    backend's measured default, `DEFAULT_CHUNK_ROWS`). Calls are also kept within `memory_gb` and
    shrunk (to the device count times a power of two) when a group has fewer rows to evaluate.
  memory_gb: the activation memory one call may take (0: half the accelerators' memory, or a
    quarter of the host's on a CPU), estimated per row by `row_bytes`.
  examples_per_group: examples whose image features are computed together and whose exact
    coalitions share chunks; a multiple of the device count.
  """
  text_players: str = "words"
  tokens_per_player: int = 1
  max_text_players: int = 0  # 0: no limit.
  value: str = "logit"  # Or 'log_prob', 'log_odds', 'contrast' (see the module docstring).
  method: str = "auto"
  max_exact_players: int = 16
  budget: int = 0
  chunk_size: int = 0
  memory_gb: float = 0.0
  examples_per_group: int = 8
  image_players: str = "embeddings"  # Or 'patches' (pixel patches; see the module docstring).
  patch_grid: int = 0  # Patches a side; 0: the MM-SHAP authors' rule per example.
  patch_fill: float = 0.0  # A masked patch's pixels, in the model's (normalised) input space.
  seed: int = 0

  def __post_init__(self):
    if self.text_players not in TEXT_GROUPINGS:
      raise ValueError(f"text_players={self.text_players!r}; use one of {TEXT_GROUPINGS}.")
    if self.value not in VALUES:
      raise ValueError(f"value={self.value!r}; use one of {VALUES}.")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; use one of {METHODS}.")
    if self.image_players not in IMAGE_PLAYERS:
      raise ValueError(f"image_players={self.image_players!r}; use one of {IMAGE_PLAYERS}.")
    for name in ("tokens_per_player", "examples_per_group"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}; it must be positive.")
    for name in ("max_text_players", "budget", "chunk_size", "memory_gb", "patch_grid"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)}; it must be >= 0 (0: no limit / default).")
    if not 0 <= self.max_exact_players <= shapley.MAX_EXACT_PLAYERS:
      raise ValueError(
          f"max_exact_players={self.max_exact_players}; exact values are computed for at most "
          f"{shapley.MAX_EXACT_PLAYERS} players (2**{shapley.MAX_EXACT_PLAYERS} evaluations).")


@dataclasses.dataclass
class Result:
  """MM-SHAP of a batch of B examples; player axes are padded to P slots.

  phi (B, P): Shapley value per player, NaN on slots without a player.
  player_modality (B, P): TEXT (0), IMAGE (1) or NO_PLAYER (-1).
  player_names (B, P): the words of each text player ('image 0' ...; '' on empty slots), when the
    explainer has a tokenizer, else None.
  t_shap, v_shap (B,): modality shares (NaN when every phi is 0).
  exact (B,): whether phi is exact (else KernelSHAP / permutation estimates).
  targets, predictions (B,): the explained class and the class predicted on the full input.
  value_full, value_empty (B,): the explained value with every / no player present; phi sums to
    their difference.
  num_evaluations (B,): coalition rows evaluated.
  """
  phi: np.ndarray
  player_modality: np.ndarray
  player_names: np.ndarray | None
  t_shap: np.ndarray
  v_shap: np.ndarray
  exact: np.ndarray
  targets: np.ndarray
  predictions: np.ndarray
  value_full: np.ndarray
  value_empty: np.ndarray
  num_evaluations: np.ndarray

  @classmethod
  def concatenate(cls, results: Sequence[Result]) -> Result:
    fields = {}
    for field in dataclasses.fields(cls):
      parts = [getattr(r, field.name) for r in results]
      fields[field.name] = None if any(p is None for p in parts) else np.concatenate(parts)
    return cls(**fields)


def _put(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array, the same on every process, as a global array."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(array: jax.Array) -> np.ndarray:
  """Every row of a call's values: gathered from every process when the explainer's mesh spans
  several, read locally when it holds this process's devices only (the mmshap stage's)."""
  if not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


# --------------------------------------------------------------------------------------------------
# How many coalition rows one forward call takes.

TRIM_MULTIPLE = 8  # A group's token arrays are cut to a multiple of this beyond its longest title.
_TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "player_of_token")

# Measured (docs/BENCHMARKS.md, scripts/bench_mmshap_vs_shap.py): on a CPU, calls of 64 rows of a
# MiniLM MMBT were 8-25% faster than 1,024-row ones; an accelerator needs large calls to be busy.
DEFAULT_CHUNK_ROWS = {"cpu": 64}
ACCELERATOR_CHUNK_ROWS = 1024


def memory_budget(memory_gb: float = 0.0) -> int:
  """Bytes of activations one call may take: `memory_gb`, else half of the local accelerators'
  memory, else a quarter of the host's (CPU devices share it)."""
  if memory_gb:
    return int(memory_gb * 2**30)
  devices = jax.local_devices()
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(0.5 * stats["bytes_limit"] * len(devices))
  return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def call_rows(needed: int, *, devices: int, cap: int, fits: int) -> int:
  """Rows of the next call: the device count times a power of two (a few compiled shapes), enough
  for `needed` rows when that is within `cap` and `fits`, and never fewer than the device count."""
  limit = max(devices, min(cap, fits))
  rows = devices
  while rows < needed and rows * 2 <= limit:
    rows *= 2
  return rows


# --------------------------------------------------------------------------------------------------
# The explainer.


class Explainer:
  """MM-SHAP of any image-text model, through a game (`games`): an MMBT is played with its image
  embeddings or pixel patches as `options.image_players` says; any other model through a
  `games.PatchGame`. One compiled forward per (rows, examples_per_group, length) shape."""

  def __init__(self, model: mmbt_lib.MMBT | games.Game, options: Options = Options(), *,
               mesh: jax.sharding.Mesh | None = None, tokenizer: TitleTokenizer | None = None):
    """A model is used in eval mode (a copy is switched; the caller's module is not changed)."""
    self.options = options
    # 'contrast' combines the logits on the host: its device program is the logits' one.
    value = "logit" if options.value == "contrast" else options.value
    if isinstance(model, games.Game):
      if model.value != value:
        raise ValueError(f"the game computes value={model.value!r} but options.value="
                         f"{options.value!r} asks for {value!r}: build the game with value={value!r}.")
      self.game = model
    elif options.image_players == "patches":
      self.game = games.mmbt_patch_game(model, value=value, grid=options.patch_grid,
                                        fill=options.patch_fill)
    else:
      self.game = games.EmbeddingGame(model, value)
    self.mesh = mesh or parallel.make_mesh()
    self.tokenizer = tokenizer
    devices = self.mesh.devices.size
    self.devices = devices
    self.max_rows = options.chunk_size or DEFAULT_CHUNK_ROWS.get(
        self.mesh.devices.flat[0].platform, ACCELERATOR_CHUNK_ROWS)
    self.budget = memory_budget(options.memory_gb)
    self.row_bytes = self.game.row_bytes
    for name in ("chunk_size", "examples_per_group"):
      if getattr(options, name) % devices:
        raise ValueError(f"{name}={getattr(options, name)} does not split over {devices} devices: "
                         f"use a multiple of {devices}.")
    self.leaves = parallel.replicate(self.game.leaves, self.mesh)
    self.rows_sharding = parallel.data_sharded(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

  def explain(self, batch: Mapping[str, np.ndarray], *, targets: np.ndarray | None = None,
              indices: np.ndarray | None = None, progress: tqdm | None = None,
              on_rows: Callable[[int, int | None], None] | None = None) -> Result:
    """MM-SHAP of every example of a batch.

    batch: tokenizer output (input_ids, attention_mask, token_type_ids, word_ids; (B, L)) and
      pixel_values (B, H, W, 3), or for the embedding game image_features (B, N, D); `id` names
      examples in errors.
    targets (B,): classes to explain; None explains the class predicted on the full input.
    indices (B,): the examples' positions in their split; each sampled example draws from the key
      (options.seed, index), so estimates do not depend on how examples are batched.
    progress: a tqdm bar advanced per explained example.
    on_rows(rows, group_rows): called after each forward call with the real coalition rows it
      evaluated and the exact rows of its group of examples (None for a sampled example).
    """
    input_ids = np.asarray(batch["input_ids"])
    size, length = input_ids.shape
    ids = ([input_pipeline.as_text(i) for i in batch["id"]] if "id" in batch
           else [f"#{i}" for i in range(size)])
    if "word_ids" not in batch:
      raise ValueError("the batch has no word_ids: text players are built from the tokenizer's "
                       "word ids (TitleTokenizer output).")
    player_of_token, num_text = text_players(
        batch["word_ids"], grouping=self.options.text_players,
        tokens_per_player=self.options.tokens_per_player,
        max_text_players=self.options.max_text_players)
    num_slots = text_slots(length, self.options)
    check_players(player_of_token, num_text, num_slots, ids)
    inputs = {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": np.asarray(batch["attention_mask"], np.int32),
        "token_type_ids": np.asarray(batch.get("token_type_ids", np.zeros_like(input_ids)), np.int32),
        "player_of_token": player_of_token,
        "num_text_players": num_text,
    }
    if ("pixel_values" in batch) == ("image_features" in batch):
      raise ValueError("pass exactly one of pixel_values or image_features in the batch.")
    image_key = "pixel_values" if "pixel_values" in batch else "image_features"
    if image_key != self.game.image_input and not isinstance(self.game, games.EmbeddingGame):
      raise ValueError(f"this game reads {self.game.image_input}, not {image_key}.")
    inputs[image_key] = np.asarray(batch[image_key])
    inputs["num_image_players"] = self.game.image_players(inputs)
    num_slots = (num_slots, self.game.image_slots(length))  # Text slots, image slots.
    targets = None if targets is None else np.asarray(targets, np.int32)
    indices = np.arange(size) if indices is None else np.asarray(indices)
    group_size = self.options.examples_per_group
    results = []
    for start in range(0, size, group_size):
      part = slice(start, start + group_size)
      results.append(self._explain_group(
          {k: v[part] for k, v in inputs.items()}, ids[part], num_slots,
          None if targets is None else targets[part], indices[part], progress, on_rows))
    result = Result.concatenate(results)
    if self.tokenizer is not None:
      result.player_names = self._player_names(input_ids, player_of_token, num_text,
                                               inputs["num_image_players"], num_slots)
    return result

  # ------------------------------------------------------------------------------------------------

  def _call_rows(self, group, needed: int) -> int:
    length = group["input_ids"].shape[1]
    return call_rows(needed, devices=self.devices, cap=self.max_rows,
                     fits=self.budget // self.row_bytes(length))

  def _explain_group(self, inputs, ids, slots, targets, indices, progress, on_rows) -> Result:
    size = len(ids)
    text_slots_, image_slots = slots
    # Padding tokens are out of attention and no player's: every coalition's forward skips them,
    # down to the group's longest title (rounded up to 8 tokens, for few compiled lengths).
    longest = int(np.max(np.flatnonzero(np.asarray(inputs["attention_mask"]).any(axis=0)),
                         initial=0)) + 1
    keep = min(inputs["input_ids"].shape[1], -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE)
    inputs = {k: v[:, :keep] if k in _TOKEN_FIELDS else v for k, v in inputs.items()}
    padded = {k: _pad_examples(v, self.options.examples_per_group) for k, v in inputs.items()}
    padded = self.game.prepare(self.leaves, padded, lambda a: _put(a, self.rows_sharding))
    group = {k: jax.device_put(v, self.replicated) if isinstance(v, jax.Array)
             else _put(v, self.replicated) for k, v in padded.items()}
    num_image = inputs["num_image_players"]
    num_players = inputs["num_text_players"] + num_image
    width = text_slots_ + image_slots
    outcomes: list[tuple | None] = [None] * size

    def choose(slot: int, full_values: np.ndarray) -> tuple[int, int]:
      """(target, prediction) from the full coalition's values for every class."""
      prediction = int(np.argmax(full_values))
      target = prediction if targets is None else int(targets[slot])
      if not 0 <= target < full_values.shape[-1]:
        raise ValueError(f"example {ids[slot]!r}: target class {target} is not one of the model's "
                         f"{full_values.shape[-1]} classes.")
      return target, prediction

    def finish(slot: int, phi: np.ndarray, *rest) -> None:
      padded_phi = np.full(width, np.nan)
      padded_phi[:len(phi)] = phi
      outcomes[slot] = (padded_phi, *rest)
      if progress is not None:
        progress.update(1)

    method = self.options.method
    limit = self.options.max_exact_players if method == "auto" else shapley.MAX_EXACT_PLAYERS
    batched = [s for s in range(size) if method in ("auto", "exact") and num_players[s] <= limit]
    if batched:
      describe = lambda slot: functools.partial(self._describe, ids[slot],
                                                int(inputs["num_text_players"][slot]),
                                                int(num_image[slot]))
      self._exact_rows(group, batched, num_players, width, choose, finish, describe, on_rows)
    for slot in sorted(set(range(size)) - set(batched)):
      self._sampled(group, slot, int(num_players[slot]), width, ids[slot], int(indices[slot]),
                    choose, finish, on_rows)
    return self._assemble(outcomes, inputs["num_text_players"], num_image)

  def _exact_rows(self, group, slots, num_players, width, choose, finish, describe,
                  on_rows) -> None:
    """Every coalition of the given examples, packed back to back into chunks of rows.

    Each example's coalitions run from the full one down to the empty one, so its first chunk
    holds the full coalition and fixes the explained class; the host then keeps only that class's
    2**p values (float64) per example in flight, not all classes.
    """
    sizes = np.asarray([num_players[s] for s in slots], np.int64)
    counts = np.left_shift(1, sizes)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chunk = self._call_rows(group, int(offsets[-1]))
    bits = np.arange(int(sizes.max()))
    tables: dict[int, tuple[np.ndarray, int, int, np.ndarray]] = {}
    filled = np.zeros(len(slots), np.int64)
    in_flight = collections.deque()

    def collect(values, which, coalitions):
      values = _to_host(values)[:len(which)]
      if on_rows is not None:
        on_rows(len(which), int(offsets[-1]))
      for position in np.unique(which):
        rows = which == position
        _check_finite(values[rows], coalitions[rows], describe(slots[position]))
        if position not in tables:  # The example's first chunk: its full coalition is here.
          full_values = values[rows][coalitions[rows] == counts[position] - 1][0]
          target, prediction = choose(slots[position], full_values)
          weights = self._target_weights(full_values, target)
          tables[position] = (np.empty(counts[position]), target, prediction, weights)
        table, target, prediction, weights = tables[position]
        table[coalitions[rows]] = (values[rows, target] if weights is None
                                   else np.asarray(values[rows], np.float64) @ weights)
        filled[position] += rows.sum()
        if filled[position] == counts[position]:
          del tables[position]
          phi = shapley.shapley_from_values(table, int(sizes[position]))
          finish(slots[position], phi, True, target, prediction, table[-1], table[0],
                 int(counts[position]))

    for start in range(0, int(offsets[-1]), chunk):
      rows = np.arange(start, min(start + chunk, int(offsets[-1])))
      which = np.searchsorted(offsets, rows, side="right") - 1
      coalitions = offsets[which + 1] - 1 - rows  # Full coalition first.
      masks = np.zeros((chunk, width), bool)
      masks[:len(rows), :bits.size] = (coalitions[:, None] >> bits) & 1
      row_example = np.zeros(chunk, np.int32)
      row_example[:len(rows)] = np.asarray(slots, np.int32)[which]
      in_flight.append((self._values(group, row_example, masks), which, coalitions))
      if len(in_flight) > 1:  # The next chunk is queued before this one is read back.
        collect(*in_flight.popleft())
    while in_flight:
      collect(*in_flight.popleft())

  def _sampled(self, group, slot, num_players, width, example_id, index, choose, finish,
               on_rows) -> None:
    chunk = self.max_rows

    def value_fn(masks):
      masks = np.asarray(masks)
      values = []
      step = self._call_rows(group, len(masks))
      for start in range(0, len(masks), step):
        part = masks[start:start + step]
        rows = self._call_rows(group, len(part))  # The last part may take a smaller call.
        padded = np.zeros((rows, width), bool)
        padded[:len(part), :num_players] = part
        values.append(_to_host(self._values(group, np.full(rows, slot, np.int32), padded))
                      [:len(part)])
        if on_rows is not None:
          on_rows(len(part), None)
      return np.concatenate(values)

    key = jax.random.fold_in(jax.random.key(self.options.seed), index)
    try:
      result = shapley.shapley(value_fn, num_players, method=self.options.method,
                               max_exact_players=self.options.max_exact_players,
                               budget=self.options.budget or None, key=key, chunk_size=chunk,
                               jit=False)
    except ValueError as error:
      raise ValueError(f"example {example_id!r} ({num_players} players): {error}") from error
    value_full, value_empty = np.asarray(result.value_full), np.asarray(result.value_empty)
    phi = np.asarray(result.phi)
    target, prediction = choose(slot, value_full)
    weights = self._target_weights(value_full, target)
    if weights is None:
      phi, value_full, value_empty = phi[:, target], value_full[target], value_empty[target]
    else:  # Shapley values are linear in the value: combine the classes' phi.
      phi, value_full, value_empty = (np.asarray(x, np.float64) @ weights
                                      for x in (phi, value_full, value_empty))
    finish(slot, phi, False, target, prediction, value_full, value_empty, result.num_evaluations)

  def _target_weights(self, full_values: np.ndarray, target: int) -> np.ndarray | None:
    """Weights over the classes' values that make the game (None: the target's value alone)."""
    return contrast_weights(full_values, target) if self.options.value == "contrast" else None

  def _values(self, group, row_example: np.ndarray, masks: np.ndarray) -> jax.Array:
    return self.game.values(self.leaves, group, _put(row_example, self.rows_sharding),
                            _put(masks, self.rows_sharding))

  def _assemble(self, outcomes, num_text, num_image) -> Result:
    phi, exact, targets, predictions, full, empty, evaluations = (np.asarray(x) for x in
                                                                  zip(*outcomes))
    modality = player_modality(num_text, num_image, phi.shape[1])
    t_shap, v_shap = modality_shares(phi, modality)
    return Result(phi=phi.astype(np.float32), player_modality=modality, player_names=None,
                  t_shap=t_shap, v_shap=v_shap, exact=exact.astype(bool),
                  targets=targets.astype(np.int32), predictions=predictions.astype(np.int32),
                  value_full=full, value_empty=empty, num_evaluations=evaluations.astype(np.int64))

  def _describe(self, example_id: str, num_text: int, num_image: int, coalition: int) -> str:
    present = [i for i in range(num_text + num_image) if coalition >> i & 1]
    text = [i for i in present if i < num_text]
    image = [i - num_text for i in present if i >= num_text]
    kind = "image embeddings" if isinstance(self.game, games.EmbeddingGame) else "image patches"
    return (f"example {example_id!r}, coalition {coalition} (present: text players {text} of "
            f"{num_text}, {kind} {image} of {num_image}; bit i of the index is player i, "
            "text players first)")

  def _player_names(self, input_ids, player_of_token, num_text, num_image, slots) -> np.ndarray:
    names = np.full((len(input_ids), sum(slots)), "", dtype=object)
    kind = "image" if isinstance(self.game, games.EmbeddingGame) else "patch"
    for row in range(len(input_ids)):
      for player in range(num_text[row]):
        tokens = input_ids[row][player_of_token[row] == player].tolist()
        names[row, player] = self.tokenizer.tokenizer.decode(tokens)
      for image in range(num_image[row]):
        names[row, num_text[row] + image] = f"{kind} {image}"
    return names.astype(str)


def _pad_examples(array: np.ndarray, size: int) -> np.ndarray:
  """Fills a short last group with copies of its first example (never explained, only computed)."""
  missing = size - len(array)
  return array if not missing else np.concatenate([array, np.repeat(array[:1], missing, axis=0)])


def _check_finite(values: np.ndarray, coalitions: np.ndarray, describe: Callable[[int], str]) -> None:
  """Values (k, C) of the given coalitions; names the lowest coalition with a non-finite value."""
  finite = np.isfinite(values).all(axis=1)
  if not finite.all():
    row = int(np.argmin(np.where(finite, np.iinfo(np.int64).max, coalitions)))
    raise ValueError(
        f"the model's value is {values[row].tolist()} for {describe(int(coalitions[row]))}. "
        "Shapley values need a finite value for every coalition: check the model's weights and its "
        "output when these players are masked.")


# --------------------------------------------------------------------------------------------------
# Dataset summaries.


def _share_stats(t_shap: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
  defined = np.isfinite(t_shap)
  stats = {"count": int(t_shap.size), "num_exact": int(exact.sum()),
           "num_undefined": int((~defined).sum())}
  if defined.any():
    values = t_shap[defined]
    stats.update(t_shap_mean=float(values.mean()), t_shap_std=float(values.std()),
                 v_shap_mean=float(1 - values.mean()), v_shap_std=float(values.std()))
  else:
    stats.update(t_shap_mean=None, t_shap_std=None, v_shap_mean=None, v_shap_std=None)
  return stats


def summarize(t_shap: np.ndarray, exact: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
              designed_text_share: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Mean and std of the shares over a split and per true class (NaN shares counted, not averaged).

  designed_text_share: class name -> the share a toyshop class was built with, written next to
  the measured one.
  """
  t_shap, exact, labels = np.asarray(t_shap), np.asarray(exact, bool), np.asarray(labels)
  per_class = []
  for index, name in enumerate(class_names):
    members = labels == index
    entry = {"class": name, **_share_stats(t_shap[members], exact[members])}
    if designed_text_share is not None:
      entry["designed_text_share"] = designed_text_share.get(name)
    per_class.append(entry)
  return {**_share_stats(t_shap, exact), "per_class": per_class}
