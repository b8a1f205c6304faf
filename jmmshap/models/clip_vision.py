"""CLIP's ViT image tower in Flax NNX, loading Hugging Face CLIPModel / CLIPVisionModel checkpoints.

Same math as transformers' CLIPVisionModel: patch embedding, class token, learned positions, a
LayerNorm before the encoder ("pre_layrnorm"), pre-LN encoder layers, and a LayerNorm on the class
token only (`pooler_output`); `last_hidden_state` is the encoder output without it.

Other image sizes. The positions are learned on a fixed grid (224 px / 32 px patches = 7x7). For
another size they are resized bicubically on that grid, the class position kept, with the same
kernel as torch's `interpolate(mode="bicubic", align_corners=False)` (cubic a=-0.75, edge-clamped),
which is what transformers' `interpolate_pos_encoding=True` uses:
  * at load: `from_pretrained(..., image_size=288)` resizes the checkpoint's table once and the model
    then owns a 9x9 table (what the paper fine-tuned at 288 px);
  * on the fly: any input whose patch grid differs from the model's table is run with a resized copy
    (no error, like transformers with `interpolate_pos_encoding=True`).
`jax.image.resize(method="cubic")` is not used: its kernel has a=-0.5 and is renormalised at the
edges, which moved a unit-variance 4x4 -> 6x6 table by up to 0.28 from transformers' result (ours: 1e-6).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmmshap.models import hf, initializers

_OIHW_TO_HWIO = (2, 3, 1, 0)
_OUT_IN_TO_IN_OUT = (1, 0)
_TORCH_BICUBIC_A = -0.75


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU; its checkpoints were trained with it."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The vision tower's shape; the defaults are ViT-B/32 (openai/clip-vit-base-patch32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"CLIPVisionConfig: hidden_act={self.hidden_act!r}; supported are "
                       f"{sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPVisionConfig: hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}; the last pixels would be dropped.")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a CLIPConfig dict (its `vision_config` is used) or a CLIPVisionConfig dict.

    Keys missing from config.json take transformers' defaults, as transformers does.
    """
    model_type = hf_config.get("model_type")
    if model_type == "clip" or "vision_config" in hf_config:
      hf_config = hf_config.get("vision_config") or {}
    elif model_type not in (None, "clip_vision_model"):
      raise hf.CheckpointError(f"config.json has model_type={model_type!r}, not a CLIP config.")
    defaults = cls()
    values = {}
    for field in dataclasses.fields(cls):
      value = hf_config.get(field.name, getattr(defaults, field.name))
      if field.name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
          raise hf.CheckpointError(f"CLIP config: non-square {field.name}={value} is not supported.")
        value = value[0]
      values[field.name] = value
    return cls(**values)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of torch's bicubic resize (align_corners=False, edge-clamped)."""
  a = _TORCH_BICUBIC_A
  def kernel(d):
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))
  source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  floor = np.floor(source)
  matrix = np.zeros((out_size, in_size), np.float64)
  for offset in (-1, 0, 1, 2):
    columns = np.clip(floor + offset, 0, in_size - 1).astype(np.int64)
    np.add.at(matrix, (np.arange(out_size), columns), kernel(source - (floor + offset)))
  return matrix


def resize_position_embedding(table: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """(1 + g*g, D) positions -> (1 + h*w, D): the patch grid resized bicubically, class position kept."""
  old_grid = math.isqrt(table.shape[0] - 1)
  if old_grid * old_grid != table.shape[0] - 1:
    raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square patch grid.")
  height, width = new_grid
  if (height, width) == (old_grid, old_grid):
    return table
  grid = table[1:].reshape(old_grid, old_grid, table.shape[-1])
  rows = jnp.asarray(_bicubic_matrix(old_grid, height), jnp.float32)
  cols = jnp.asarray(_bicubic_matrix(old_grid, width), jnp.float32)
  # HIGHEST so that TPU/GPU matmuls do not round the weights to bf16/tf32.
  resized = jnp.einsum("ih,jw,hwd->ijd", rows, cols, grid.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST).astype(table.dtype)
  return jnp.concatenate([table[:1], resized.reshape(height * width, -1)], axis=0)


class Attention(nnx.Module):
  """Multi-head self-attention with HF's separate q/k/v/out projections (softmax in float32)."""

  def __init__(self, config: CLIPVisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.q_proj = nnx.Linear(width, width, **layer_kwargs)
    self.k_proj = nnx.Linear(width, width, **layer_kwargs)
    self.v_proj = nnx.Linear(width, width, **layer_kwargs)
    self.out_proj = nnx.Linear(width, width, **layer_kwargs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`mask` (B, 1, L, L) bool: which keys each query may attend to (None: all; the text tower
    passes its causal and padding mask)."""
    batch, length, width = x.shape
    heads = lambda projected: projected.reshape(batch, length, self.num_heads, -1)
    attended = jax.nn.dot_product_attention(
        heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask=mask)
    return self.out_proj(attended.reshape(batch, length, width))


class MLP(nnx.Module):
  """The feed-forward half of a layer: width -> intermediate_size -> width."""

  def __init__(self, config: CLIPVisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = _ACTIVATIONS[config.hidden_act]
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **layer_kwargs)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **layer_kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, config: CLIPVisionConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, epsilon = config.hidden_size, config.layer_norm_eps
    self.layer_norm1 = nnx.LayerNorm(width, epsilon=epsilon, **layer_kwargs)
    self.self_attn = Attention(config, **layer_kwargs)
    self.layer_norm2 = nnx.LayerNorm(width, epsilon=epsilon, **layer_kwargs)
    self.mlp = MLP(config, **layer_kwargs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPVisionModel(nnx.Module):
  """CLIP ViT image tower. `image_size` (default: the config's) sets the grid of the position table.

  `__call__(pixel_values)` takes NHWC images whose sides are multiples of the patch size and returns
  `last_hidden_state` (B, 1 + num_patches, D), class token first and patches row-major, and
  `pooler_output` (B, D), the post-LayerNorm class token.
  """

  def __init__(self, config: CLIPVisionConfig, *, image_size: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if image_size is not None and image_size != config.image_size:
      config = dataclasses.replace(config, image_size=image_size)
    self.config = config
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, patch = config.hidden_size, config.patch_size
    self.patch_embedding = nnx.Conv(config.num_channels, width, (patch, patch),
                                    strides=(patch, patch), padding="VALID", use_bias=False,
                                    kernel_init=initializers.conv_kernel(1.0, "fan_in"),
                                    **layer_kwargs)
    # HF's init scales; checkpoints overwrite them.
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(width ** -0.5)(rngs.params(), (width,), param_dtype))
    self.position_embedding = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (1 + config.grid_size ** 2, width), param_dtype))
    self.pre_layrnorm = nnx.LayerNorm(width, epsilon=config.layer_norm_eps, **layer_kwargs)
    self.layers = nnx.List([EncoderLayer(config, **layer_kwargs)
                            for _ in range(config.num_hidden_layers)])
    self.post_layernorm = nnx.LayerNorm(width, epsilon=config.layer_norm_eps, **layer_kwargs)

  def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
    config = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != config.num_channels:
      raise ValueError(
          f"CLIPVisionModel expects NHWC images with {config.num_channels} channels, got shape "
          f"{pixel_values.shape}; transpose NCHW arrays with x.transpose(0, 2, 3, 1).")
    batch, height, width, _ = pixel_values.shape
    if height % config.patch_size or width % config.patch_size:
      raise ValueError(f"CLIPVisionModel: image size {height}x{width} is not a multiple of the "
                       f"patch size {config.patch_size}; resize or crop the images.")
    patches = self.patch_embedding(pixel_values)
    patches = patches.reshape(batch, -1, config.hidden_size)
    class_token = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                                   (batch, 1, config.hidden_size))
    positions = resize_position_embedding(
        self.position_embedding[...], (height // config.patch_size, width // config.patch_size))
    x = jnp.concatenate([class_token, patches], axis=1) + positions.astype(patches.dtype)
    x = self.pre_layrnorm(x)
    for layer in self.layers:
      x = layer(x)
    return {"last_hidden_state": x, "pooler_output": self.post_layernorm(x[:, 0])}


class CLIPVisionClassifier(nnx.Module):
  """The vision tower with a linear head on its pooled class token: an image learner that can start
  from a contrastively pretrained tower (e.g. the clip_pretrain stage's export).

  The head starts at zero (as in big_vision's fine-tuning): the first steps move the head, not the
  pretrained features, and the loss starts at log(num_labels).
  """

  def __init__(self, vision: CLIPVisionModel, num_labels: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.vision = vision
    self.classifier = nnx.Linear(vision.config.hidden_size, num_labels,
                                 kernel_init=nnx.initializers.zeros_init(), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
    pooled = self.vision(pixel_values)["pooler_output"]
    return {"logits": self.classifier(pooled), "pooler_output": pooled}


# --------------------------------------------------------------------------------------------------
# Checkpoint import.

# A CLIPModel folder also holds the text tower and both projections; only the image tower is ours.
_OTHER_CLIP_TENSORS = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def checkpoint_targets(model: CLIPVisionModel
                        ) -> dict[str, tuple[nnx.Variable, tuple[int, ...] | None]]:
  """HF tensor name (without `vision_model.`) -> (variable, torch-to-flax axis permutation)."""
  targets = {
      "embeddings.class_embedding": (model.class_embedding, None),
      "embeddings.patch_embedding.weight": (model.patch_embedding.kernel, _OIHW_TO_HWIO),
      "embeddings.position_embedding.weight": (model.position_embedding, None),
  }
  def layer_norm(name, module):
    targets[f"{name}.weight"] = (module.scale, None)
    targets[f"{name}.bias"] = (module.bias, None)
  def linear(name, module):
    targets[f"{name}.weight"] = (module.kernel, _OUT_IN_TO_IN_OUT)
    targets[f"{name}.bias"] = (module.bias, None)
  layer_norm("pre_layrnorm", model.pre_layrnorm)
  layer_norm("post_layernorm", model.post_layernorm)
  for i, layer in enumerate(model.layers):
    prefix = f"encoder.layers.{i}"
    layer_norm(f"{prefix}.layer_norm1", layer.layer_norm1)
    layer_norm(f"{prefix}.layer_norm2", layer.layer_norm2)
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
      linear(f"{prefix}.self_attn.{projection}", getattr(layer.self_attn, projection))
    linear(f"{prefix}.mlp.fc1", layer.mlp.fc1)
    linear(f"{prefix}.mlp.fc2", layer.mlp.fc2)
  return targets


def save_pretrained(model: CLIPVisionModel, path: str) -> None:
  """Writes a Hugging Face CLIPVisionModel folder (config.json + model.safetensors).

  A tower trained here (e.g. by the contrastive `clip_pretrain` stage) then loads anywhere a CLIP
  checkpoint does: `from_pretrained` here, or transformers' `CLIPVisionModel.from_pretrained`.
  """
  tensors = {f"vision_model.{name}": value
             for name, value in hf.export_tensors(checkpoint_targets(model)).items()}
  hf.save_folder(path, tensors, {"model_type": "clip_vision_model",
                                 "architectures": ["CLIPVisionModel"],
                                 **dataclasses.asdict(model.config)})


def from_pretrained(path: str, hf_config: Mapping[str, Any] | None = None, *,
                    image_size: int | None = None, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
                    ) -> tuple[CLIPVisionModel, CLIPVisionConfig]:
  """A Hugging Face CLIPModel or CLIPVisionModel folder -> (vision model, its config).

  `image_size` other than the checkpoint's resizes the position table at load (see the module
  docstring); the returned config then carries the new `image_size`. `rngs` is unused (every weight
  comes from the checkpoint) and accepted so that all `from_pretrained` share one signature.
  """
  del rngs
  hf_config = hf.read_config(path) if hf_config is None else hf_config
  config = CLIPVisionConfig.from_hf(hf_config)
  tensors = hf.strip_prefix(hf.read_tensors(path), ("vision_model.",))
  # A buffer that older transformers saved; it is always arange(num_positions).
  tensors.pop("embeddings.position_ids", None)

  model = nnx.eval_shape(lambda: CLIPVisionModel(config, dtype=dtype, param_dtype=param_dtype,
                                                 rngs=nnx.Rngs(0)))
  targets = checkpoint_targets(model)
  hf.check_keys(path, set(targets), set(tensors), ignored_prefixes=_OTHER_CLIP_TENSORS)
  hf.assign_tensors(path, tensors, targets)

  if image_size is not None and image_size != config.image_size:
    config = dataclasses.replace(config, image_size=image_size)
    model.config = config
    grid = (config.grid_size, config.grid_size)
    model.position_embedding.set_value(
        resize_position_embedding(model.position_embedding[...], grid))
  model.eval()
  return model, config
