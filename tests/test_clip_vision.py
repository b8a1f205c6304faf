"""CLIP vision tower against transformers' PyTorch CLIP: both folder kinds, other image sizes, errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jmmshap import models
from jmmshap.models import clip_vision

TOLERANCE = 1e-4
# 32 px images in 8 px patches: a 4x4 grid, so resizing the positions is a real interpolation.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _forward(model, images):
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))


def _randomise(vision: torch.nn.Module):
  """Unit-scale positions and non-trivial LayerNorms: HF's init (std 0.02, ones/zeros) hides mistakes."""
  with torch.no_grad():
    vision.embeddings.position_embedding.weight.normal_()
    for module in vision.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.normal_(1.0, 0.2)
        module.bias.normal_(0.0, 0.2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{"clip_vision_model": (torch vision model, folder), "clip": (...)} with different weights."""
  torch.manual_seed(0)
  vision_only = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).eval()
  _randomise(vision_only)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=8)).eval()
  _randomise(clip.vision_model)
  out = {}
  for kind, model, vision in (("clip_vision_model", vision_only, vision_only),
                              ("clip", clip, clip.vision_model)):
    folder = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(folder)
    out[kind] = (vision, folder)
  return out


def _images(height, width, seed=0):
  return np.random.RandomState(seed).randn(2, height, width, 3).astype(np.float32)


def _torch_outputs(vision, images_nhwc, interpolate=False):
  with torch.no_grad():
    out = vision(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)),
                 interpolate_pos_encoding=interpolate)
  return {"last_hidden_state": out.last_hidden_state.numpy(),
          "pooler_output": out.pooler_output.numpy()}


def _assert_matches(ours, reference):
  assert set(ours) == set(reference)
  for name, expected in reference.items():
    got = np.asarray(ours[name])
    assert got.shape == expected.shape, name
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0, err_msg=name)


@pytest.mark.parametrize("kind", ["clip_vision_model", "clip"])
def test_checkpoint_matches_transformers(checkpoints, kind):
  vision, folder = checkpoints[kind]
  model, config = models.from_pretrained(folder)
  assert config == clip_vision.CLIPVisionConfig(**TINY_VISION)
  images = _images(32, 32)
  _assert_matches(_forward(model, images), _torch_outputs(vision, images))


def test_saved_tower_reloads_here_and_in_transformers(checkpoints, tmp_path):
  vision, folder = checkpoints["clip"]
  model, _ = models.from_pretrained(folder)
  clip_vision.save_pretrained(model, str(tmp_path / "export"))
  reloaded, config = models.from_pretrained(str(tmp_path / "export"))
  assert config == model.config
  torch_reloaded = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "export")).eval()
  images = _images(32, 32, seed=3)
  reference = _torch_outputs(vision, images)
  _assert_matches(_forward(reloaded, images), reference)
  _assert_matches(_torch_outputs(torch_reloaded, images), reference)


def test_other_image_sizes_match_transformers_interpolate_pos_encoding(checkpoints):
  vision, folder = checkpoints["clip_vision_model"]
  model, _ = models.from_pretrained(folder)
  for height, width in ((48, 48), (24, 40)):  # up-sampled; down- and up-sampled, non-square
    images = _images(height, width, seed=height)
    _assert_matches(_forward(model, images), _torch_outputs(vision, images, interpolate=True))


def test_positions_resized_at_load_match_transformers(checkpoints):
  vision, folder = checkpoints["clip"]
  model, config = models.from_pretrained(folder, image_size=48)
  assert config.image_size == 48 and config.grid_size == 6
  assert model.position_embedding.shape == (1 + 6 * 6, 32)
  images = _images(48, 48, seed=3)
  _assert_matches(_forward(model, images), _torch_outputs(vision, images, interpolate=True))


def test_resize_position_embedding_keeps_class_position_and_identity_grid():
  table = jnp.asarray(np.random.RandomState(0).randn(1 + 16, 4).astype(np.float32))
  assert clip_vision.resize_position_embedding(table, (4, 4)) is table
  resized = clip_vision.resize_position_embedding(table, (5, 3))
  assert resized.shape == (1 + 15, 4)
  np.testing.assert_array_equal(resized[0], table[0])
  # A constant grid stays constant: the bicubic weights of every output position sum to one.
  constant = jnp.ones((17, 4))
  np.testing.assert_allclose(clip_vision.resize_position_embedding(constant, (7, 2)), 1.0, atol=1e-6)


def test_param_count_matches_transformers_vit_b32():
  vit_b32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32)
  with torch.device("meta"):
    torch_model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vit_b32))
  config = clip_vision.CLIPVisionConfig(**vit_b32)
  model = nnx.eval_shape(lambda: clip_vision.CLIPVisionModel(config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == sum(p.numel() for p in torch_model.parameters())
  # patches 3*32*32*768 + class 768 + positions 50*768 + two LayerNorms 2*1536
  # + 12 layers * (4 attention projections 4*(768*768+768) + two LayerNorms 2*1536
  #               + fc1 768*3072+3072 + fc2 3072*768+768); openai's 87.85M adds the 768x512 projection.
  assert count == 87_456_000


def test_config_from_clip_config_or_vision_config():
  vision = dict(TINY_VISION, hidden_act="gelu", image_size=[32, 32])
  from_vision = clip_vision.CLIPVisionConfig.from_hf(dict(vision, model_type="clip_vision_model"))
  from_clip = clip_vision.CLIPVisionConfig.from_hf(
      {"model_type": "clip", "vision_config": vision, "text_config": TINY_TEXT})
  assert from_vision == from_clip
  assert (from_clip.image_size, from_clip.hidden_act, from_clip.layer_norm_eps) == (32, "gelu", 1e-5)
  # A CLIPConfig saved with only non-default vision values: the rest are transformers' defaults.
  assert clip_vision.CLIPVisionConfig.from_hf({"model_type": "clip", "vision_config": {
      "patch_size": 16}}) == clip_vision.CLIPVisionConfig(patch_size=16)


def test_bfloat16_compute_stays_close_to_float32(checkpoints):
  _, folder = checkpoints["clip_vision_model"]
  reference, _ = models.from_pretrained(folder)
  model, _ = models.from_pretrained(folder, dtype=jnp.bfloat16)
  assert model.layers[0].mlp.fc1.kernel.dtype == jnp.float32
  images = _images(32, 32)
  out = _forward(model, images)
  assert out["pooler_output"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["pooler_output"], np.float32),
                             np.asarray(_forward(reference, images)["pooler_output"]),
                             atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# Bad input.


def _copy_folder(folder, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(folder, target)
  return target


def test_missing_tensor_is_named(checkpoints, tmp_path):
  folder = _copy_folder(checkpoints["clip"][1], tmp_path)
  weights = os.path.join(folder, "model.safetensors")
  tensors = load_file(weights)
  del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
  save_file(tensors, weights)
  with pytest.raises(models.CheckpointError,
                     match=r"missing tensors \(1\): encoder\.layers\.1\.mlp\.fc2\.bias"):
    models.from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_both_shapes(checkpoints, tmp_path):
  folder = _copy_folder(checkpoints["clip_vision_model"][1], tmp_path)
  config_file = os.path.join(folder, "config.json")
  with open(config_file) as f:
    config = json.load(f)
  config["intermediate_size"] = 48
  with open(config_file, "w") as f:
    json.dump(config, f)
  with pytest.raises(models.CheckpointError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight has shape "
                                                   r"\(64, 32\) but the model expects \(48, 32\)"):
    models.from_pretrained(folder)


def test_checkpoint_of_another_architecture_is_refused(checkpoints, tmp_path):
  torch.manual_seed(0)
  resnet = transformers.ResNetModel(transformers.ResNetConfig(
      depths=[1], hidden_sizes=[8], embedding_size=8, layer_type="basic"))
  folder = _copy_folder(checkpoints["clip_vision_model"][1], tmp_path)
  save_file({k: v.numpy() for k, v in resnet.state_dict().items()},
            os.path.join(folder, "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="(?s)missing tensors.*embeddings.class_embedding"
                                                   ".*unexpected tensors.*embedder.*another architecture"):
    models.from_pretrained(folder)


def test_bad_images_are_refused_with_the_reason(checkpoints):
  model, _ = models.from_pretrained(checkpoints["clip_vision_model"][1])
  with pytest.raises(ValueError, match=r"NHWC .* got shape \(2, 3, 32, 32\)"):
    model(jnp.zeros((2, 3, 32, 32)))
  with pytest.raises(ValueError, match=r"30x32 is not a multiple of the patch size 8"):
    model(jnp.zeros((2, 30, 32, 3)))
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    clip_vision.CLIPVisionConfig(hidden_act="relu")


def test_classifier_head_reads_the_pooled_class_token_and_starts_at_zero():
  vision = clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(**TINY_VISION), rngs=nnx.Rngs(0))
  model = clip_vision.CLIPVisionClassifier(vision, num_labels=5, rngs=nnx.Rngs(1))
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  outputs = model(jnp.asarray(images))
  np.testing.assert_array_equal(outputs["logits"], np.zeros((2, 5)))  # log(5) loss at the start.
  np.testing.assert_allclose(outputs["pooler_output"], vision(jnp.asarray(images))["pooler_output"],
                             rtol=1e-6)
  kernel = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
  model.classifier.kernel.set_value(jnp.asarray(kernel))
  np.testing.assert_allclose(model(jnp.asarray(images))["logits"],
                             np.asarray(outputs["pooler_output"]) @ kernel, rtol=1e-5, atol=1e-5)
