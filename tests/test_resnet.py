"""ResNet against transformers' PyTorch ResNet: HF and torchvision checkpoints, BatchNorm modes, errors."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jmmshap import models
from jmmshap.models import resnet

TOLERANCE = 1e-4
TINY = dict(depths=[2, 1], embedding_size=8)
TINY_WIDTHS = {"basic": [8, 16], "bottleneck": [16, 32]}
NUM_LABELS = 3


def _forward(model, images):
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))


def _torch_resnet(layer_type: str, seed: int) -> transformers.ResNetForImageClassification:
  """A tiny HF ResNet with random BatchNorm affine and running statistics (not the identity init)."""
  torch.manual_seed(seed)
  config = transformers.ResNetConfig(layer_type=layer_type, hidden_sizes=TINY_WIDTHS[layer_type],
                                     num_labels=NUM_LABELS, **TINY)
  model = transformers.ResNetForImageClassification(config).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.5)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.normal_(1.0, 0.2)
        module.bias.normal_(0.0, 0.2)
  return model


def _torch_outputs(model, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
  features = out.hidden_states[-1].numpy()
  return {"last_hidden_state": features.transpose(0, 2, 3, 1),
          "pooler_output": features.mean(axis=(2, 3)), "logits": out.logits.numpy()}


def _torchvision_state(hf_state: dict[str, torch.Tensor], to_numpy=lambda t: t.numpy()
                       ) -> dict[str, np.ndarray]:
  """HF ResNet tensor names -> torchvision's (same math, other names)."""
  rules = [
      (r"^resnet\.embedder\.embedder\.convolution\.", "conv1."),
      (r"^resnet\.embedder\.embedder\.normalization\.", "bn1."),
      (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
      (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
      (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
      (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
       lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
      (r"^classifier\.1\.", "fc."),
  ]
  renamed = {}
  for name, tensor in hf_state.items():
    new_name = name
    for pattern, replacement in rules:
      new_name, count = re.subn(pattern, replacement, name)
      if count:
        break
    assert new_name != name, f"no torchvision name for {name}"
    renamed[new_name] = to_numpy(tensor)
  return renamed


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """For each block type: the torch model and its HF folder."""
  out = {}
  for seed, layer_type in enumerate(("basic", "bottleneck")):
    model = _torch_resnet(layer_type, seed)
    folder = str(tmp_path_factory.mktemp(f"hf_{layer_type}"))
    model.save_pretrained(folder)
    out[layer_type] = (model, folder)
  return out


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)


def _assert_matches(ours, reference):
  assert set(ours) == set(reference)
  for name, expected in reference.items():
    got = np.asarray(ours[name])
    assert got.shape == expected.shape, name
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0, err_msg=name)


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_checkpoint_matches_transformers(checkpoints, images, layer_type):
  torch_model, folder = checkpoints[layer_type]
  model, config = models.from_pretrained(folder)
  assert (config.layer_type, config.depths, config.depth) == (
      layer_type, (2, 1), 8 if layer_type == "basic" else 11)
  _assert_matches(_forward(model, images), _torch_outputs(torch_model, images))


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_an_exported_folder_loads_into_transformers_with_the_same_outputs_and_labels(
    checkpoints, images, tmp_path, layer_type):
  """save_pretrained writes what transformers' ResNetForImageClassification reads: same features and
  logits as our model, the class names as id2label, and no weight left to initialise."""
  model, _ = models.from_pretrained(checkpoints[layer_type][1])
  folder = str(tmp_path / "export")
  resnet.save_pretrained(model, folder, class_names=["boot", "bag", "cap"])
  exported, loading = transformers.ResNetForImageClassification.from_pretrained(
      folder, output_loading_info=True)
  assert not any(loading.values()), loading
  assert exported.config.id2label == {0: "boot", 1: "bag", 2: "cap"}
  _assert_matches(_forward(model, images), _torch_outputs(exported.eval(), images))
  with pytest.raises(ValueError, match="2 class names for a 3-label head"):
    resnet.save_pretrained(model, folder, class_names=["boot", "bag"])


def test_a_small_stem_backbone_round_trips_through_its_own_folder(images, tmp_path):
  """A headless small-stem ResNet (no transformers equivalent) exports and reloads here with the
  same features: the stem is recorded as `small_stem`."""
  config = resnet.ResNetConfig(depths=(1, 1), layer_type="basic", hidden_sizes=(8, 16),
                               embedding_size=8, small_stem=True)
  model = resnet.ResNet(config, rngs=nnx.Rngs(3))
  folder = str(tmp_path / "export")
  resnet.save_pretrained(model, folder)
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["architectures"] == ["ResNetModel"]
  loaded, loaded_config = models.from_pretrained(folder)
  assert loaded_config.small_stem and loaded.head is None
  model.eval()
  _assert_matches(_forward(loaded, images), {k: np.asarray(v) for k, v in
                                             _forward(model, images).items()})


@pytest.mark.parametrize("layer_type,file_name", [("basic", "resnet.pth"),
                                                  ("bottleneck", "resnet.safetensors")])
def test_torchvision_state_dict_matches_transformers(checkpoints, images, tmp_path, layer_type,
                                                     file_name):
  torch_model, _ = checkpoints[layer_type]
  state = _torchvision_state(torch_model.state_dict())
  assert "layer1.0.bn1.num_batches_tracked" in state  # ignored on import
  path = str(tmp_path / file_name)
  if file_name.endswith(".pth"):
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  else:
    save_file(state, path)
  model, config = models.from_pretrained(path)
  assert (config.layer_type, config.depths, config.hidden_sizes, config.embedding_size) == (
      layer_type, (2, 1), tuple(TINY_WIDTHS[layer_type]), 8)
  _assert_matches(_forward(model, images), _torch_outputs(torch_model, images))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_layout_is_read_off_the_tensor_names(depth):
  layer_type, depths = resnet.DEPTH_PRESETS[depth]
  with torch.device("meta"):
    torch_model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        depths=list(depths), layer_type=layer_type, num_labels=1000,
        hidden_sizes=[64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]))
  # Full-size names and shapes without the memory: zero-stride views of one float.
  state = _torchvision_state(torch_model.state_dict(),
                             lambda t: np.broadcast_to(np.float32(0), tuple(t.shape)))
  assert resnet.torchvision_config("resnet.pth", state) == resnet.ResNetConfig(depth=depth)


def test_num_labels_replaces_or_drops_the_checkpoint_head(checkpoints, caplog):
  _, folder = checkpoints["basic"]
  with caplog.at_level(logging.INFO):
    model, _ = models.from_pretrained(folder, num_labels=5,
                                      rngs=nnx.Rngs(jax.random.key(7, impl="rbg")))
  assert model.head.kernel.shape == (16, 5)
  assert "3-label classifier is not loaded; a fresh 5-label head" in caplog.text
  kept, _ = models.from_pretrained(folder, num_labels=NUM_LABELS)
  assert kept.head.kernel.shape == (16, NUM_LABELS)
  features_only, _ = models.from_pretrained(folder, num_labels=0)
  assert features_only.head is None
  # The backbone is loaded the same way whatever happens to the head.
  np.testing.assert_array_equal(features_only.stages[1][0].shortcut.conv.kernel[...],
                                model.stages[1][0].shortcut.conv.kernel[...])


def test_param_counts_match_transformers_resnet152():
  hf_kwargs = dict(depths=[3, 8, 36, 3], hidden_sizes=[256, 512, 1024, 2048],
                   layer_type="bottleneck", embedding_size=64)  # microsoft/resnet-152
  with torch.device("meta"):
    torch_model = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(num_labels=1000, **hf_kwargs))
  config = resnet.ResNetConfig.from_hf(hf_kwargs)
  assert config == resnet.ResNetConfig(depth=152)
  model = nnx.eval_shape(lambda: resnet.ResNet(config, num_labels=1000, rngs=nnx.Rngs(0)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  backbone = total - sum(x.size for x in jax.tree.leaves(nnx.state(model.head, nnx.Param)))

  assert total == sum(p.numel() for p in torch_model.parameters())
  assert backbone == sum(p.numel() for p in torch_model.resnet.parameters())
  # torchvision's documented resnet152 size (ImageNet head included), and that minus fc (2048*1000+1000).
  assert total == 60_192_808
  assert backbone == 58_143_808


def test_train_mode_updates_running_stats_and_eval_mode_uses_them():
  config = resnet.ResNetConfig(depths=(1, 1), layer_type="basic", hidden_sizes=(8, 16),
                               embedding_size=8, small_stem=True)
  # One compiled init with the rbg PRNG: eager threefry inits compile once per weight shape (slow on CPU).
  model = nnx.jit(lambda: resnet.ResNet(config, num_labels=2,
                                        rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
  images = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3).astype(np.float32) * 2 + 1)
  stem_features = model.stem.conv(images)  # what the stem's BatchNorm sees
  step = nnx.jit(lambda m, x: m(x))

  model.train()
  outputs = step(model, images)
  # small stem: no stride before stage 1, one stride-2 stage after it.
  assert outputs["last_hidden_state"].shape == (4, 16, 16, 16)
  assert outputs["logits"].shape == (4, 2)
  batch_mean = jnp.mean(stem_features, axis=(0, 1, 2))
  batch_var = jnp.var(stem_features, axis=(0, 1, 2))
  np.testing.assert_allclose(model.stem.norm.mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.stem.norm.var[...], 0.9 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)

  model.eval()
  mean, var = model.stem.norm.mean[...], model.stem.norm.var[...]
  first = step(model, images)
  np.testing.assert_array_equal(model.stem.norm.mean[...], mean)  # eval leaves the averages alone
  # Each example is normalised with the averages, not with its batch: change the others, same output.
  others_changed = images.at[1:].set(-images[1:])
  np.testing.assert_allclose(step(model, others_changed)["logits"][0], first["logits"][0],
                             rtol=1e-6, atol=1e-6)
  expected_stem = ((stem_features - mean) / jnp.sqrt(var + 1e-5) * model.stem.norm.scale[...]
                   + model.stem.norm.bias[...])
  np.testing.assert_allclose(model.stem(images), expected_stem, rtol=1e-4, atol=1e-5)


def _conv_count(model, images) -> int:
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)["logits"])(state, images)
  return str(jaxpr).count("conv_general_dilated")


def test_small_output_maps_run_as_a_matmul_with_the_convolutions_numbers():
  # Four stages at 32 px: 8x8, 4x4, 2x2 and 1x1 maps. The convolutions with at most 4 output
  # positions (stage 3's and 4's, and the stride-2 shortcuts into them) become patch matmuls.
  def build(matmul_conv_positions):
    config = resnet.ResNetConfig(depths=(1, 1, 1, 1), layer_type="basic", hidden_sizes=(8, 8, 16, 16),
                                 embedding_size=8, matmul_conv_positions=matmul_conv_positions)
    return resnet.ResNet(config, num_labels=3, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  images = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32))
  with_matmuls, convolutions_only = build(4), build(0)
  assert _conv_count(convolutions_only, images) == 12  # stem + 8 block convs + 3 stride-2 shortcuts
  # Stage 3 (3x3/2 into 2x2 and its 1x1/2 shortcut, then a 3x3 at 2x2) and stage 4 likewise.
  assert _conv_count(with_matmuls, images) == 12 - 6
  for mode in ("train", "eval"):
    getattr(with_matmuls, mode)(), getattr(convolutions_only, mode)()
    np.testing.assert_allclose(_forward(with_matmuls, images)["logits"],
                               _forward(convolutions_only, images)["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, 2), (3, 2, 3), (1, 2, 4), (7, 2, 4)])
def test_conv_as_matmul_is_the_padded_strided_convolution(kernel_size, stride, size):
  x = jnp.asarray(np.random.RandomState(3).randn(2, size, size, 5).astype(np.float32))
  kernel = jnp.asarray(np.random.RandomState(4).randn(kernel_size, kernel_size, 5, 6), jnp.float32)
  pad = kernel_size // 2
  expected = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(resnet.conv_as_matmul(x, kernel, stride, pad), expected,
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_batch_stats(checkpoints, images):
  _, folder = checkpoints["basic"]
  reference, _ = models.from_pretrained(folder)
  model, _ = models.from_pretrained(folder, dtype=jnp.bfloat16)
  out = _forward(model, images)
  assert out["logits"].dtype == jnp.bfloat16
  assert model.stem.norm.mean.dtype == jnp.float32 and model.stem.conv.kernel.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out["logits"], np.float32),
                             np.asarray(_forward(reference, images)["logits"]), atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# Bad input.


def _copy_folder(folder, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(folder, target)
  return target


def test_missing_tensor_is_named(checkpoints, tmp_path):
  folder = _copy_folder(checkpoints["bottleneck"][1], tmp_path)
  weights = os.path.join(folder, "model.safetensors")
  tensors = load_file(weights)
  del tensors["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"]
  save_file(tensors, weights)
  with pytest.raises(models.CheckpointError, match=r"missing tensors \(1\): "
                     r"encoder\.stages\.1\.layers\.0\.shortcut\.normalization\.running_var"):
    models.from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_both_shapes(checkpoints, tmp_path):
  folder = _copy_folder(checkpoints["basic"][1], tmp_path)
  config_file = os.path.join(folder, "config.json")
  with open(config_file) as f:
    config = json.load(f)
  config["hidden_sizes"] = [8, 12]
  with open(config_file, "w") as f:
    json.dump(config, f)
  with pytest.raises(models.CheckpointError,
                     match=r"stages\.1\.layers\.0\.layer\.0\.convolution\.weight has shape "
                           r"\(16, 8, 3, 3\) but the model expects \(12, 8, 3, 3\)"):
    models.from_pretrained(folder)


def test_checkpoint_of_another_architecture_is_refused(checkpoints, tmp_path):
  torch.manual_seed(0)
  vit = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8))
  vit_file = str(tmp_path / "vit.safetensors")
  save_file({k: v.numpy() for k, v in vit.state_dict().items()}, vit_file)
  with pytest.raises(models.CheckpointError, match="not a torchvision ResNet state dict"):
    resnet.from_torchvision(vit_file)
  # A ResNet config.json next to ViT weights: every tensor is listed as missing or unexpected.
  folder = _copy_folder(checkpoints["basic"][1], tmp_path)
  shutil.copy(vit_file, os.path.join(folder, "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="(?s)missing tensors.*unexpected tensors.*"
                                                   "another architecture"):
    models.from_pretrained(folder)


def test_pth_without_torch_suggests_safetensors(tmp_path, monkeypatch):
  path = str(tmp_path / "resnet18.pth")
  with open(path, "wb") as f:
    f.write(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(models.CheckpointError, match="(?s)torch is not installed.*safetensors"):
    models.from_pretrained(path)


def test_nchw_images_and_bad_configs_are_refused():
  config = resnet.ResNetConfig(depths=(1,), layer_type="basic", hidden_sizes=(4,), embedding_size=4)
  model = nnx.eval_shape(lambda: resnet.ResNet(config, rngs=nnx.Rngs(0)))  # fails before any math
  with pytest.raises(ValueError, match=r"NHWC .* got shape \(1, 3, 32, 32\)"):
    model(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="depth=20 is not one of"):
    resnet.ResNetConfig(depth=20)
  with pytest.raises(ValueError, match="depth=18 disagrees"):
    resnet.ResNetConfig(depth=18, depths=(1, 1), layer_type="basic", hidden_sizes=(4, 8))
