"""The pretrained checkpoints a stage starts from, and whether it can use them, known before any work.

A stage lists what it starts from (`Checkpoint`: the setting naming the folder, the model types it
builds on, the fields it changes at load, where the tokenizer comes from). The stage reads each
through `architecture`, and the pipeline checks them all with `problems` before the first stage
runs, so the two agree on what is usable. A checkpoint is usable when
  - it resolves as the loaders resolve it (`hf.resolve_path`): a folder or torchvision file, a
    `pip:` package path, or a hub name found in the local cache or, online, on the hub (which
    downloads the files the stage would download when it starts). A hub name that is not cached
    while HF_HUB_OFFLINE=1 is reported at once: the stage would fail on it the same way;
  - its config.json names a model type the stage builds, and the fields the stage changes at load
    fit it (`models.architecture`, the loaders' own check: a BERT cut to more layers than it has, a
    CLIP tower resized to an image size that its patch size does not divide); a text tower has a
    position for every token of data.max_length (its sizes otherwise replace the config's);
  - a folder has its weights file;
  - a text tower's tokenizer loads, with no more ids than the tower's embedding table has rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import ml_collections

from jmmshap import models
from jmmshap.models import hf
from jmmshap.models.hf import CheckpointError, ModelTypeError
from jmmshap.tokenizer import TitleTokenizer

# The model families of config.json's `model_type`, as `models.from_pretrained` builds them.
BERT = ("bert",)
RESNET = ("resnet",)  # Or a torchvision state-dict file.
CLIP = ("clip", "clip_vision_model")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A setting of a stage config that names a checkpoint, and what the stage builds from it."""
  key: str  # Dotted, e.g. "init_from_image", "data.tokenizer".
  role: str  # What the stage builds from it, for messages: "the MMBT's text tower".
  model_types: tuple[str, ...] = ()  # The model types it may hold; (): only its tokenizer is read.
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Fields set at load.
  tokenizer: str | None = None  # The setting whose folder holds the tokenizer it reads titles with.
  positions: int | None = None  # The token positions a text tower is fed (data.max_length).
  # Another model type -> the setting under which the stage would build on it ("model.kind='clip'").
  alternatives: Mapping[str, str] = dataclasses.field(default_factory=dict)


def value(config: ml_collections.ConfigDict, key: str) -> Any:
  """A dotted setting of `config`; None where it or a parent is missing."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
      return None
    node = node.get(part)
  return node


def vocabulary_problem(stage: str, tokenizer_ids: int, embedding_rows: int) -> str | None:
  """A pretrained text tower must be fed ids of its own vocabulary."""
  if tokenizer_ids <= embedding_rows:
    return None
  return (f"the {stage} stage's tokenizer has {tokenizer_ids} ids but its pretrained text tower's "
          f"embedding table has {embedding_rows} rows: use the checkpoint's own tokenizer (leave "
          "data.tokenizer empty) or one made for that checkpoint.")


def _detail(error: Exception, path: str) -> str:
  """An error's message without the path it starts with (the caller names the setting and path)."""
  message = str(error)
  return message[len(path) + 2:] if message.startswith(f"{path}: ") else message


def _holds(error: ModelTypeError, checkpoint: Checkpoint) -> str:
  found = ("names no model_type in its config.json" if error.found is None
           else f"holds a {error.found!r} model (its config.json's model_type)")
  other = checkpoint.alternatives.get(error.found)
  return (f"{found}, but {checkpoint.role} starts from a "
          f"{' or '.join(map(repr, checkpoint.model_types))} checkpoint"
          + (f": use {other} or another checkpoint." if other else "."))


def _architecture(path: str, checkpoint: Checkpoint) -> dict[str, Any]:
  """`models.architecture` of a checkpoint for a stage; CheckpointError: why it cannot be used."""
  try:
    found = models.architecture(path, checkpoint.model_types, **checkpoint.overrides)
  except ModelTypeError as error:
    raise CheckpointError(_holds(error, checkpoint)) from None
  rows = found.get("max_position_embeddings")
  if checkpoint.positions and rows is not None and checkpoint.positions > rows:
    raise CheckpointError(f"its {rows} token positions are fewer than data.max_length="
                          f"{checkpoint.positions}: set data.max_length to {rows} or less.")
  return found


def architecture(config: ml_collections.ConfigDict, checkpoint: Checkpoint) -> dict[str, Any]:
  """The architecture the checkpoint a stage's setting names holds, at the sizes the stage loads
  it; a CheckpointError naming the setting when the stage cannot build on it."""
  path = value(config, checkpoint.key)
  try:
    return _architecture(path, checkpoint)
  except CheckpointError as error:
    raise CheckpointError(f"{checkpoint.key}={path!r}: {_detail(error, path)}") from None


def _locate(path: Any) -> str:
  """The local folder or file of a checkpoint setting; CheckpointError: why there is none."""
  if not isinstance(path, str) or not path:
    raise CheckpointError(f"not a path ({type(path).__name__}).")
  resolved = hf.resolve_path(path)
  if not os.path.exists(resolved):
    raise CheckpointError("no such folder or file"
                          + (f" ({resolved})." if resolved != path else "."))
  return resolved


def _tokenizer_problem(config: ml_collections.ConfigDict, checkpoint: Checkpoint,
                       found: Mapping[str, Any], located: Mapping[str, str]
                       ) -> tuple[str, str] | None:
  """(setting, problem) of the tokenizer a text checkpoint is fed with, or None; `found`: the
  architectures read so far, `located`: the folders resolved so far, by setting."""
  key = checkpoint.tokenizer
  path = value(config, key)
  try:
    folder = located[key] if key in located else _locate(path)
  except CheckpointError as error:
    return key, _detail(error, path)
  try:
    tokenizer = TitleTokenizer.from_folder(folder, max_length=max(3, value(config, "data.max_length")
                                                                  or 3))
  except FileNotFoundError as error:
    if key != checkpoint.key or not checkpoint.model_types:  # A folder named for its tokenizer.
      return key, _detail(error, folder)
    return key, (f"no tokenizer.json or vocab.txt in {folder}: {checkpoint.role} reads the titles "
                 "with its checkpoint's tokenizer; add its tokenizer files there, or set "
                 "data.tokenizer to a folder that holds them.")
  except Exception as error:  # pylint: disable=broad-except  # `tokenizers` raises plain Exception.
    return key, f"its tokenizer cannot be read ({type(error).__name__}: {error})."
  rows = (found.get(checkpoint.key) or {}).get("vocab_size")
  problem = rows and vocabulary_problem(config.get("stage"), tokenizer.vocab_size, rows)
  return (key, problem) if problem else None


def problems(config: ml_collections.ConfigDict, checkpoints: Sequence[Checkpoint], *,
             skip: Collection[str] = (), tokenizers: bool = True) -> list[tuple[str, str]]:
  """(setting, problem) for each checkpoint of a stage config (its `workdir:` paths resolved) that
  the stage could not use, every one of them; settings in `skip` are not read (an earlier stage of
  the job writes them), nor with `tokenizers` False the tokenizers (the stage has its own saved)."""
  found: dict[str, Any] = {}
  located: dict[str, str] = {}
  reported: list[tuple[str, str]] = []
  for checkpoint in checkpoints:
    key = checkpoint.key
    if key in skip:
      continue
    path = value(config, key)
    try:
      folder = located[key] = _locate(path)
    except CheckpointError as error:
      reported.append((key, _detail(error, path)))
      continue
    try:
      if checkpoint.model_types:
        found[key] = _architecture(folder, checkpoint)  # Resolved once (a hub name: one look-up).
        if os.path.isdir(folder):
          hf.weights_file(folder)
    except CheckpointError as error:
      reported.append((key, _detail(error, folder)))
      continue
    if checkpoint.tokenizer and tokenizers and checkpoint.tokenizer not in skip:
      problem = _tokenizer_problem(config, checkpoint, found, located)
      if problem is not None and problem not in reported:
        reported.append(problem)
  return reported
