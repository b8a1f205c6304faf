"""The whole CLIP in Flax NNX: its text tower, the vision tower of `clip_vision`, both projections and
the learned temperature, loading Hugging Face CLIPModel checkpoints.

Same math as transformers' CLIPModel. The text tower embeds tokens and learned positions, runs
pre-LN layers (the vision tower's) under a causal mask (and the padding mask), applies a final
LayerNorm, and pools the hidden state of the end-of-text token: the highest id of each row for the
original checkpoints (`eos_token_id` 2 in their config, transformers' rule), else the first
`eos_token_id`. Image and text embeddings are projected (no bias), L2-normalised, and their cosine
scaled by exp(logit_scale) is `logits_per_image` (B_images, B_texts). `match_scores` is the
diagonal: each image with its own text, the image-sentence score MM-SHAP's authors explain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jmmshap.models import clip_vision, hf

_OUT_IN_TO_IN_OUT = (1, 0)
_LEGACY_EOS_TOKEN_ID = 2  # transformers: pool at the highest token id (the original checkpoints).


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text tower's shape; defaults are openai/clip-vit-base-patch32's."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = _LEGACY_EOS_TOKEN_ID

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> CLIPTextConfig:
    """From a CLIPConfig dict (its `text_config`) or a CLIPTextConfig dict; missing keys take
    transformers' defaults."""
    if hf_config.get("model_type") == "clip" or "text_config" in hf_config:
      hf_config = hf_config.get("text_config") or {}
    defaults = cls()
    return cls(**{f.name: hf_config.get(f.name, getattr(defaults, f.name))
                  for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig()
  vision: clip_vision.CLIPVisionConfig = clip_vision.CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> CLIPConfig:
    if hf_config.get("model_type") != "clip":
      raise hf.CheckpointError(f"config.json has model_type={hf_config.get('model_type')!r}, not "
                               "'clip': a whole CLIPModel checkpoint is needed (text and vision).")
    return cls(CLIPTextConfig.from_hf(hf_config), clip_vision.CLIPVisionConfig.from_hf(hf_config),
               hf_config.get("projection_dim", 512),
               hf_config.get("logit_scale_init_value", 2.6592))


class CLIPTextModel(nnx.Module):
  """CLIP's text transformer: `last_hidden_state` (B, L, D) and `pooler_output` (B, D)."""

  def __init__(self, config: CLIPTextConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **layer_kwargs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                        **layer_kwargs)
    self.layers = nnx.List([clip_vision.EncoderLayer(config, **layer_kwargs)
                            for _ in range(config.num_hidden_layers)])
    self.final_layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                          **layer_kwargs)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    batch, length = input_ids.shape
    if length > self.config.max_position_embeddings:
      # Out-of-range positions would be NaN-filled by the gather under jit.
      raise ValueError(f"CLIPTextModel: sequence length {length} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}; truncate the tokenized text to at "
                       f"most {self.config.max_position_embeddings} tokens.")
    x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, mask)
    x = self.final_layer_norm(x)
    if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      end = jnp.argmax(input_ids, axis=-1)
    else:
      end = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
    return {"last_hidden_state": x, "pooler_output": x[jnp.arange(batch), end]}


class CLIPModel(nnx.Module):
  """Text and vision towers, their projections and the temperature."""

  def __init__(self, config: CLIPConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    layer_kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_model = CLIPTextModel(config.text, **layer_kwargs)
    self.vision_model = clip_vision.CLIPVisionModel(config.vision, **layer_kwargs)
    self.text_projection = nnx.Linear(config.text.hidden_size, config.projection_dim,
                                      use_bias=False, **layer_kwargs)
    self.visual_projection = nnx.Linear(config.vision.hidden_size, config.projection_dim,
                                        use_bias=False, **layer_kwargs)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None,
            pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(text embeddings, image embeddings), projected and L2-normalised, float32."""
    text = self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])
    image = self.visual_projection(self.vision_model(pixel_values)["pooler_output"])
    normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return normalise(text.astype(jnp.float32)), normalise(image.astype(jnp.float32))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
               pixel_values: jax.Array) -> dict[str, jax.Array]:
    text, image = self.embed(input_ids, attention_mask, pixel_values)
    logits_per_image = jnp.exp(self.logit_scale[...].astype(jnp.float32)) * image @ text.T
    return {"logits_per_image": logits_per_image, "logits_per_text": logits_per_image.T,
            "text_embeds": text, "image_embeds": image}

  def match_scores(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                   pixel_values: jax.Array) -> jax.Array:
    """(B, 1): each image's score with its own text, exp(logit_scale) * cosine."""
    text, image = self.embed(input_ids, attention_mask, pixel_values)
    return (jnp.exp(self.logit_scale[...].astype(jnp.float32))
            * jnp.sum(text * image, axis=-1))[:, None]


def _text_targets(model: CLIPTextModel) -> dict[str, tuple[nnx.Variable, tuple[int, ...] | None]]:
  targets = {"embeddings.token_embedding.weight": (model.token_embedding.embedding, None),
             "embeddings.position_embedding.weight": (model.position_embedding.embedding, None),
             "final_layer_norm.weight": (model.final_layer_norm.scale, None),
             "final_layer_norm.bias": (model.final_layer_norm.bias, None)}
  for i, layer in enumerate(model.layers):
    prefix = f"encoder.layers.{i}"
    for name in ("layer_norm1", "layer_norm2"):
      norm = getattr(layer, name)
      targets[f"{prefix}.{name}.weight"] = (norm.scale, None)
      targets[f"{prefix}.{name}.bias"] = (norm.bias, None)
    linears = {f"self_attn.{p}": getattr(layer.self_attn, p)
               for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    linears.update({"mlp.fc1": layer.mlp.fc1, "mlp.fc2": layer.mlp.fc2})
    for name, linear in linears.items():
      targets[f"{prefix}.{name}.weight"] = (linear.kernel, _OUT_IN_TO_IN_OUT)
      targets[f"{prefix}.{name}.bias"] = (linear.bias, None)
  return targets


def from_pretrained(path: str, hf_config: Mapping[str, Any] | None = None, *,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    rngs: nnx.Rngs | None = None) -> tuple[CLIPModel, CLIPConfig]:
  """A Hugging Face CLIPModel folder (or hub name) -> (model in eval mode, its config)."""
  del rngs  # Every weight comes from the checkpoint.
  path = hf.resolve_path(path)
  config = CLIPConfig.from_hf(hf.read_config(path) if hf_config is None else hf_config)
  tensors = dict(hf.read_tensors(path))
  for buffer in ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"):
    tensors.pop(buffer, None)  # Buffers older transformers saved: always arange.
  model = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(0)))
  targets = {f"text_model.{name}": target for name, target in _text_targets(model.text_model).items()}
  targets.update({f"vision_model.{name}": target for name, target in
                  clip_vision.checkpoint_targets(model.vision_model).items()})
  targets["text_projection.weight"] = (model.text_projection.kernel, _OUT_IN_TO_IN_OUT)
  targets["visual_projection.weight"] = (model.visual_projection.kernel, _OUT_IN_TO_IN_OUT)
  targets["logit_scale"] = (model.logit_scale, None)
  hf.check_keys(path, set(targets), set(tensors))
  hf.assign_tensors(path, tensors, targets)
  model.eval()
  return model, config
