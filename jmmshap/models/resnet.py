"""ResNet 18 to 152 in Flax NNX, loading Hugging Face and torchvision checkpoints.

The blocks follow torchvision's "v1.5" ResNet (the 3x3 convolution of a bottleneck carries the stride),
which is also what Hugging Face's `ResNetModel` computes, so both checkpoint formats load into one model
and give the same numbers as the PyTorch originals (tests/test_resnet.py pins this).

Images are NHWC. BatchNorm keeps its running averages in `nnx.BatchStat` variables: `model.train()`
normalises with the batch statistics and updates the averages (torch's momentum 0.1 is flax's 0.9),
`model.eval()` uses the averages. Flax updates the running variance with the biased batch variance where
torch uses the unbiased one; this only matters when training BatchNorm on very small batches.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmmshap.models import hf, initializers

# depth -> (block type, blocks per stage), as in torchvision and microsoft/resnet-*.
DEPTH_PRESETS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_STAGE_WIDTHS = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}
_CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
_BOTTLENECK_REDUCTION = 4
_BATCH_NORM_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default, used by every checkpoint we load.
_BATCH_NORM_MOMENTUM = 0.9  # flax's decay of the running averages == torch's momentum 0.1.

# He initialisation over the output fan, as torchvision and HF do for ResNet convolutions.
_CONV_INIT = initializers.conv_kernel(2.0, "fan_out")  # torchvision's kaiming_normal_(fan_out).

# torch layout -> flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out).
_OIHW_TO_HWIO = (2, 3, 1, 0)
_OUT_IN_TO_IN_OUT = (1, 0)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """A ResNet's shape. `ResNetConfig(depth=50)` is torchvision's resnet50.

  Give `depth` (18/34/50/101/152) for a standard network, or `depths` + `layer_type` for any other
  stage layout (tiny test models); `depth` then becomes the conventional layer count
  (convolutions on the main path + the classifier). `hidden_sizes` defaults to the standard stage widths.
  `small_stem` replaces the 7x7/2 convolution and max-pool by one 3x3/1 convolution, which keeps enough
  resolution for 32 to 80 px inputs (CIFAR-style); it cannot load ImageNet stems.
  `matmul_conv_positions`: a convolution whose output map has at most this many positions runs as
  one matmul of its patches (same numbers up to rounding). XLA's CPU convolution is 10-25x slower
  on 2x2 maps (the last stage at 64 px) than this matmul (scripts/bench_small_maps.py); 0 turns it off.
  """
  depth: int | None = None
  depths: tuple[int, ...] | None = None
  layer_type: str | None = None
  hidden_sizes: tuple[int, ...] | None = None
  embedding_size: int = 64
  small_stem: bool = False
  num_channels: int = 3
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  matmul_conv_positions: int = 4

  def __post_init__(self):
    depths, layer_type = self.depths, self.layer_type
    if depths is None:
      depth = 50 if self.depth is None else self.depth
      if depth not in DEPTH_PRESETS:
        raise ValueError(f"ResNetConfig: depth={depth} is not one of {sorted(DEPTH_PRESETS)}; "
                         "give `depths` and `layer_type` for another layout.")
      preset_type, depths = DEPTH_PRESETS[depth]
      if layer_type not in (None, preset_type):
        raise ValueError(f"ResNetConfig: depth={depth} uses {preset_type!r} blocks, not {layer_type!r}.")
      layer_type = preset_type
    if layer_type not in _CONVS_PER_BLOCK:
      raise ValueError(f"ResNetConfig: layer_type={layer_type!r}; use 'basic' or 'bottleneck' "
                       "(or give `depth`).")
    depths = tuple(int(d) for d in depths)
    if not depths or min(depths) < 1:
      raise ValueError(f"ResNetConfig: depths={depths} needs at least one stage of at least one block.")
    layer_count = _CONVS_PER_BLOCK[layer_type] * sum(depths) + 2
    if self.depth is not None and self.depth != layer_count:
      raise ValueError(f"ResNetConfig: depth={self.depth} disagrees with depths={depths} of "
                       f"{layer_type!r} blocks ({layer_count} layers); give one or the other.")
    hidden_sizes = self.hidden_sizes
    if hidden_sizes is None:
      if len(depths) != 4:
        raise ValueError(f"ResNetConfig: depths={depths} has {len(depths)} stages; give hidden_sizes.")
      hidden_sizes = _STAGE_WIDTHS[layer_type]
    hidden_sizes = tuple(int(h) for h in hidden_sizes)
    if len(hidden_sizes) != len(depths):
      raise ValueError(f"ResNetConfig: hidden_sizes={hidden_sizes} and depths={depths} "
                       "must have one entry per stage.")
    if layer_type == "bottleneck" and any(h % _BOTTLENECK_REDUCTION for h in hidden_sizes):
      raise ValueError(f"ResNetConfig: bottleneck hidden_sizes={hidden_sizes} must be multiples of "
                       f"{_BOTTLENECK_REDUCTION}.")
    object.__setattr__(self, "depth", layer_count)
    object.__setattr__(self, "depths", depths)
    object.__setattr__(self, "layer_type", layer_type)
    object.__setattr__(self, "hidden_sizes", hidden_sizes)

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> ResNetConfig:
    """From a Hugging Face ResNetConfig dict (config.json); missing keys take HF's defaults."""
    if hf_config.get("model_type", "resnet") != "resnet":
      raise hf.CheckpointError(f"config.json has model_type={hf_config.get('model_type')!r}, "
                               "not 'resnet'.")
    if hf_config.get("hidden_act", "relu") != "relu":
      raise hf.CheckpointError(f"ResNet config.json: hidden_act={hf_config['hidden_act']!r}; only "
                               "'relu' (every published ResNet) is supported.")
    return cls(
        depths=tuple(hf_config.get("depths", (3, 4, 6, 3))),
        layer_type=hf_config.get("layer_type", "bottleneck"),
        hidden_sizes=tuple(hf_config.get("hidden_sizes", (256, 512, 1024, 2048))),
        embedding_size=hf_config.get("embedding_size", 64),
        num_channels=hf_config.get("num_channels", 3),
        downsample_in_first_stage=hf_config.get("downsample_in_first_stage", False),
        downsample_in_bottleneck=hf_config.get("downsample_in_bottleneck", False),
        small_stem=hf_config.get("small_stem", False))

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face ResNetConfig fields of this layout (`from_hf`'s inverse). A small stem is
    recorded as an extra `small_stem` key: transformers has no such stem, so only `from_hf` reads
    it."""
    fields = {"model_type": "resnet", "num_channels": self.num_channels,
              "embedding_size": self.embedding_size, "hidden_sizes": list(self.hidden_sizes),
              "depths": list(self.depths), "layer_type": self.layer_type, "hidden_act": "relu",
              "downsample_in_first_stage": self.downsample_in_first_stage,
              "downsample_in_bottleneck": self.downsample_in_bottleneck}
    return {**fields, **({"small_stem": True} if self.small_stem else {})}


class ConvBatchNorm(nnx.Module):
  """A bias-free convolution and its BatchNorm, padded like torch (k // 2 each side, even at stride 2)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
               matmul_conv_positions: int = 0, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    pad = kernel_size // 2
    self.stride, self.pad, self.matmul_conv_positions = stride, pad, matmul_conv_positions
    self.conv = nnx.Conv(
        in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(
        out_channels, momentum=_BATCH_NORM_MOMENTUM, epsilon=_BATCH_NORM_EPSILON,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = self.conv.kernel_size[0]
    height, width = ((n + 2 * self.pad - kernel_size) // self.stride + 1 for n in x.shape[1:3])
    if height * width <= self.matmul_conv_positions:
      dtype = self.conv.dtype or x.dtype
      y = conv_as_matmul(x.astype(dtype), self.conv.kernel[...].astype(dtype), self.stride, self.pad)
    else:
      y = self.conv(x)
    return self.norm(y)


def conv_as_matmul(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """An NHWC x HWIO convolution as (patches @ kernel): what small output maps run fastest as."""
  kernel_height, kernel_width, in_channels, out_channels = kernel.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  height = (padded.shape[1] - kernel_height) // stride + 1
  width = (padded.shape[2] - kernel_width) // stride + 1
  # Patch features ordered (row, column, channel), as the HWIO kernel's reshape orders them.
  patches = jnp.concatenate(
      [padded[:, i:i + stride * (height - 1) + 1:stride, j:j + stride * (width - 1) + 1:stride]
       for i in range(kernel_height) for j in range(kernel_width)], axis=-1)
  return patches @ kernel.reshape(kernel_height * kernel_width * in_channels, out_channels)


class ResidualBlock(nnx.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block with a projection shortcut
  whenever the width or the resolution changes."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, layer_type: str, *,
               downsample_in_bottleneck: bool = False, matmul_conv_positions: int = 0, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    layer_kwargs = dict(matmul_conv_positions=matmul_conv_positions, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
    if layer_type == "basic":
      convs = [ConvBatchNorm(in_channels, out_channels, 3, stride, **layer_kwargs),
               ConvBatchNorm(out_channels, out_channels, 3, 1, **layer_kwargs)]
    else:
      reduced = out_channels // _BOTTLENECK_REDUCTION
      first_stride, middle_stride = (stride, 1) if downsample_in_bottleneck else (1, stride)
      convs = [ConvBatchNorm(in_channels, reduced, 1, first_stride, **layer_kwargs),
               ConvBatchNorm(reduced, reduced, 3, middle_stride, **layer_kwargs),
               ConvBatchNorm(reduced, out_channels, 1, 1, **layer_kwargs)]
    self.convs = nnx.List(convs)
    self.shortcut = (ConvBatchNorm(in_channels, out_channels, 1, stride, **layer_kwargs)
                     if in_channels != out_channels or stride != 1 else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch = x
    for conv_index, conv in enumerate(self.convs):
      branch = conv(branch)
      if conv_index < len(self.convs) - 1:
        branch = jax.nn.relu(branch)
    residual = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(branch + residual)


class ResNet(nnx.Module):
  """ResNet backbone with an optional linear classifier on the average-pooled features.

  `__call__(pixel_values)` takes NHWC images and returns Hugging Face's output names:
  `last_hidden_state` (B, H', W', C) feature map, `pooler_output` (B, C) and, with a head, `logits`.
  """

  def __init__(self, config: ResNetConfig, *, num_labels: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.num_labels = num_labels or None
    self.dtype = dtype
    self.param_dtype = param_dtype
    layer_kwargs = dict(matmul_conv_positions=config.matmul_conv_positions, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
    if config.small_stem:
      self.stem = ConvBatchNorm(config.num_channels, config.embedding_size, 3, 1, **layer_kwargs)
    else:
      self.stem = ConvBatchNorm(config.num_channels, config.embedding_size, 7, 2, **layer_kwargs)
    stages = []
    in_channels = config.embedding_size
    for index, (blocks, width) in enumerate(zip(config.depths, config.hidden_sizes)):
      stride = 2 if index > 0 or config.downsample_in_first_stage else 1
      stage = []
      for block in range(blocks):
        stage.append(ResidualBlock(
            in_channels, width, stride if block == 0 else 1, config.layer_type,
            downsample_in_bottleneck=config.downsample_in_bottleneck, **layer_kwargs))
        in_channels = width
      stages.append(nnx.List(stage))
    self.stages = nnx.List(stages)
    # Declared data even when None, so that `from_pretrained` can attach a fresh head later.
    self.head = nnx.data(self.make_head(self.num_labels, rngs=rngs) if self.num_labels else None)

  def make_head(self, num_labels: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A fresh classifier, also used when a checkpoint's head has another number of labels."""
    return nnx.Linear(self.config.hidden_sizes[-1], num_labels, dtype=self.dtype,
                      param_dtype=self.param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
      raise ValueError(
          f"ResNet expects NHWC images with {self.config.num_channels} channels, got shape "
          f"{pixel_values.shape}; transpose NCHW arrays with x.transpose(0, 2, 3, 1).")
    x = jax.nn.relu(self.stem(pixel_values))
    if not self.config.small_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    # Average in float32 so bf16 feature maps do not lose the pooled features' low bits.
    pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
    outputs = {"last_hidden_state": x, "pooler_output": pooled}
    if self.head is not None:
      outputs["logits"] = self.head(pooled)
    return outputs


# --------------------------------------------------------------------------------------------------
# Checkpoint import.


def _conv_batch_norm_names(model: ResNet, style: str) -> Iterator[tuple[str, str, ConvBatchNorm]]:
  """(conv tensor prefix, norm tensor prefix, module) for every conv+BN, in `style`'s naming."""
  if style == "hf":
    yield "embedder.embedder.convolution", "embedder.embedder.normalization", model.stem
  else:
    yield "conv1", "bn1", model.stem
  for stage_index, stage in enumerate(model.stages):
    for block_index, block in enumerate(stage):
      if style == "hf":
        prefix = f"encoder.stages.{stage_index}.layers.{block_index}"
        for conv_index, conv in enumerate(block.convs):
          yield (f"{prefix}.layer.{conv_index}.convolution",
                 f"{prefix}.layer.{conv_index}.normalization", conv)
        if block.shortcut is not None:
          yield f"{prefix}.shortcut.convolution", f"{prefix}.shortcut.normalization", block.shortcut
      else:
        prefix = f"layer{stage_index + 1}.{block_index}"
        for conv_index, conv in enumerate(block.convs):
          yield f"{prefix}.conv{conv_index + 1}", f"{prefix}.bn{conv_index + 1}", conv
        if block.shortcut is not None:
          yield f"{prefix}.downsample.0", f"{prefix}.downsample.1", block.shortcut


def _checkpoint_targets(model: ResNet, style: str, head_name: str | None
                        ) -> dict[str, tuple[nnx.Variable, tuple[int, ...] | None]]:
  """Checkpoint tensor name -> (model variable, torch-to-flax axis permutation or None)."""
  targets = {}
  for conv_name, norm_name, module in _conv_batch_norm_names(model, style):
    targets[f"{conv_name}.weight"] = (module.conv.kernel, _OIHW_TO_HWIO)
    targets[f"{norm_name}.weight"] = (module.norm.scale, None)
    targets[f"{norm_name}.bias"] = (module.norm.bias, None)
    targets[f"{norm_name}.running_mean"] = (module.norm.mean, None)
    targets[f"{norm_name}.running_var"] = (module.norm.var, None)
  if head_name is not None:
    targets[f"{head_name}.weight"] = (model.head.kernel, _OUT_IN_TO_IN_OUT)
    targets[f"{head_name}.bias"] = (model.head.bias, None)
  return targets


def _load(path: str, tensors: Mapping[str, np.ndarray], config: ResNetConfig, style: str,
          head_name: str, *, num_labels: int | None, dtype: Any, param_dtype: Any,
          rngs: nnx.Rngs | None) -> ResNet:
  """Builds the model abstractly (no random init of weights that are overwritten) and fills it."""
  tensors = {k: v for k, v in tensors.items() if not k.endswith(".num_batches_tracked")}
  head_weight = tensors.get(f"{head_name}.weight")
  checkpoint_labels = None if head_weight is None else int(head_weight.shape[0])
  if num_labels is None:
    num_labels = checkpoint_labels
  load_head = bool(num_labels) and num_labels == checkpoint_labels
  if checkpoint_labels is not None and not load_head:
    logging.info("%s: the checkpoint's %d-label classifier is not loaded; %s.", path,
                 checkpoint_labels, f"a fresh {num_labels}-label head is initialised" if num_labels
                 else "the model has no head (num_labels=0)")
  elif checkpoint_labels is None and num_labels:
    logging.info("%s: no classifier in the checkpoint; a fresh %d-label head is initialised.",
                 path, num_labels)

  model = nnx.eval_shape(lambda: ResNet(config, num_labels=num_labels if load_head else None,
                                        dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  targets = _checkpoint_targets(model, style, head_name if load_head else None)
  hf.check_keys(path, set(targets), set(tensors),
                ignored_prefixes=() if load_head else (f"{head_name}.",))
  hf.assign_tensors(path, tensors, targets)
  if num_labels and not load_head:
    model.num_labels = num_labels
    model.head = model.make_head(num_labels, rngs=rngs or nnx.Rngs(0))
  model.eval()
  return model


def from_pretrained(path: str, hf_config: Mapping[str, Any] | None = None, *,
                    num_labels: int | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
                    ) -> tuple[ResNet, ResNetConfig]:
  """A Hugging Face ResNetModel / ResNetForImageClassification folder -> (model in eval mode, config).

  `num_labels=None` keeps the checkpoint's classifier (if any); another positive number replaces it with
  a fresh head initialised from `rngs`; 0 drops it (features only).
  """
  hf_config = hf.read_config(path) if hf_config is None else hf_config
  config = ResNetConfig.from_hf(hf_config)
  tensors = hf.strip_prefix(hf.read_tensors(path), ("resnet.",))
  model = _load(path, tensors, config, "hf", "classifier.1", num_labels=num_labels, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
  return model, config


def save_pretrained(model: ResNet, path: str, class_names: Sequence[str] | None = None) -> None:
  """Writes a Hugging Face ResNetForImageClassification folder (config.json + model.safetensors;
  ResNetModel when the model has no head), which `from_pretrained` here and transformers load.

  `class_names` label the head's outputs (config.json's id2label). A small-stem model's folder
  loads here only (see `ResNetConfig.to_hf`).
  """
  head = "classifier.1" if model.head is not None else None
  # ResNetForImageClassification prefixes its backbone with `resnet.`; ResNetModel does not.
  backbone = "resnet." if head else ""
  tensors = {name if name.startswith("classifier.") else backbone + name: value
             for name, value in hf.export_tensors(_checkpoint_targets(model, "hf", head)).items()}
  for name in [n for n in tensors if n.endswith(".running_var")]:  # torch's BatchNorm buffer.
    tensors[name.replace(".running_var", ".num_batches_tracked")] = np.zeros((), np.int64)
  config = {"architectures": ["ResNetForImageClassification" if head else "ResNetModel"],
            **model.config.to_hf()}
  if head is not None:
    names = list(class_names) if class_names is not None else [
        f"LABEL_{i}" for i in range(model.num_labels)]
    if len(names) != model.num_labels:
      raise ValueError(f"save_pretrained: {len(names)} class names for a {model.num_labels}-label "
                       "head.")
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
  hf.save_folder(path, tensors, config)


_TORCHVISION_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.conv1\.weight$")


def torchvision_config(path: str, tensors: Mapping[str, np.ndarray]) -> ResNetConfig:
  """Infers the layout (blocks per stage, block type, widths) of a torchvision ResNet state dict."""
  blocks: dict[int, int] = {}
  for name in tensors:
    match = _TORCHVISION_BLOCK.match(name)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
  if "conv1.weight" not in tensors or not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
    sample = ", ".join(sorted(tensors)[:5])
    raise hf.CheckpointError(
        f"{path}: not a torchvision ResNet state dict (expected conv1.weight, bn1.*, layer1.0.conv1.weight"
        f", ...; found {sample}{' ...' if len(tensors) > 5 else ''}). For a Hugging Face checkpoint, "
        "pass the folder holding config.json instead.")
  layer_type = "bottleneck" if "layer1.0.conv3.weight" in tensors else "basic"
  last_conv = "conv3" if layer_type == "bottleneck" else "conv2"
  depths = tuple(blocks[s] for s in sorted(blocks))
  hidden_sizes = []
  for stage in sorted(blocks):
    name = f"layer{stage}.0.{last_conv}.weight"
    if name not in tensors:
      raise hf.CheckpointError(f"{path}: {name} is missing, so the width of stage {stage} is unknown; "
                               "the state dict is incomplete.")
    hidden_sizes.append(int(tensors[name].shape[0]))
  stem = tensors["conv1.weight"]
  if stem.ndim != 4:
    raise hf.CheckpointError(f"{path}: conv1.weight has shape {stem.shape}, not a 2-D convolution.")
  return ResNetConfig(depths=depths, layer_type=layer_type, hidden_sizes=tuple(hidden_sizes),
                      embedding_size=int(stem.shape[0]), num_channels=int(stem.shape[1]),
                      small_stem=stem.shape[2] == 3)


def from_torchvision(path: str, *, num_labels: int | None = None, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
                     ) -> tuple[ResNet, ResNetConfig]:
  """A torchvision ResNet state dict (.safetensors, or .pth/.pt with torch) -> (model in eval mode, config).

  The depth, block type and widths are read off the tensor names and shapes (a 3x3 `conv1` means
  the small stem). `num_labels` treats `fc.*` as `from_pretrained` treats HF's classifier.
  """
  if not os.path.isfile(path):
    raise hf.CheckpointError(f"{path}: no such file; expected a torchvision ResNet state dict "
                             "(.safetensors, .pth or .pt).")
  # DataParallel checkpoints prefix every name with "module.".
  tensors = hf.strip_prefix(hf.read_tensors(path), ("module.",))
  config = torchvision_config(path, tensors)
  model = _load(path, tensors, config, "torchvision", "fc", num_labels=num_labels, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs)
  return model, config

