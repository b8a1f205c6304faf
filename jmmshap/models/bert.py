"""BERT in Flax NNX, loadable from Hugging Face BertModel / BertForSequenceClassification checkpoints.

The text learner and the text tower of CLIP-MMBT. The layout follows transformers' BertModel closely
enough that a checkpoint maps tensor-for-tensor (Linear kernels transposed), and the outputs keep HF's
names, so a parity test against the PyTorch model is a plain array comparison.

`dtype` is the compute dtype and `param_dtype` the storage dtype: bfloat16 compute is one switch, while
LayerNorm statistics and the attention softmax always run in float32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmmshap.models import hf
from jmmshap.models.hf import CheckpointError

Array = jax.Array
logger = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF's "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Buffers that HF saves next to the weights; they hold no learned values.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# BertForPreTraining / BertForMaskedLM heads (e.g. in bert-base-uncased): not part of the encoder.
_PRETRAINING_HEADS = ("cls.",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture fields of an HF BertConfig; defaults are HF's (BERT-base)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  initializer_range: float = 0.02
  classifier_dropout: float | None = None

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; "
                       f"use one of {sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                       f"num_attention_heads={self.num_attention_heads}.")

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any]) -> BertConfig:
    """Reads a config.json dict; keys it leaves out take HF's defaults, as transformers does."""
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"config.json has position_embedding_type={position_type!r}; only 'absolute' "
                       "position embeddings (every released BERT) are implemented.")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
      raise ValueError("config.json describes a BERT decoder (is_decoder / add_cross_attention); "
                       "only the bidirectional encoder is implemented.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf_config.items() if k in fields})

  @classmethod
  def tiny(cls, vocab_size: int = 99) -> BertConfig:
    """A 2-layer, 32-wide BERT for tests: compiles in a second or two on a CPU."""
    return cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)

  @classmethod
  def base(cls, vocab_size: int = 30522) -> BertConfig:
    """bert-base-uncased: 12 layers, 768 wide, 12 heads."""
    return cls(vocab_size=vocab_size)


def _dense(in_features: int, out_features: int, config: BertConfig, *, dtype: Any, param_dtype: Any,
           rngs: nnx.Rngs) -> nnx.Linear:
  # HF initialises every Linear and Embedding with N(0, initializer_range): a fresh head or a model
  # trained from scratch starts where transformers' would.
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


def _layer_norm(config: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Exact variance (not E[x^2] - E[x]^2): BERT's residual stream has large outlier features.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype,
                       param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


def attention_bias(attention_mask: Array) -> Array:
  """(B, L) of 1 keep / 0 pad -> a float32 (B, 1, 1, L) bias added to the attention scores."""
  keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout.

  The tables and the LayerNorm are public attributes so that CLIP-MMBT can embed its image tokens with
  the same position / token-type tables and LayerNorm (pass them as `inputs_embeds`).
  """

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    embed = lambda n: nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                embedding_init=nnx.initializers.normal(config.initializer_range),
                                rngs=rngs)
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_position_embeddings)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.layer_norm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
    self.dtype = dtype

  def __call__(self, input_ids: Array | None = None, token_type_ids: Array | None = None,
               position_ids: Array | None = None, *, inputs_embeds: Array | None = None) -> Array:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("BertEmbeddings: pass exactly one of input_ids (B, L) or inputs_embeds (B, L, H).")
    if inputs_embeds is None:
      inputs_embeds = self.word_embeddings(input_ids)
    batch, length = inputs_embeds.shape[:2]
    if position_ids is None:
      max_positions = self.position_embeddings.num_embeddings
      if length > max_positions:
        # Out-of-range ids would be silently clipped or NaN-filled by the gather under jit.
        raise ValueError(f"BertEmbeddings: sequence length {length} exceeds max_position_embeddings="
                         f"{max_positions}; truncate the tokenized inputs to at most {max_positions}.")
      position_ids = jnp.arange(length)[None, :]
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    hidden = (inputs_embeds.astype(self.dtype) + self.position_embeddings(position_ids)
              + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.layer_norm(hidden))


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention plus its output projection (HF's BertAttention minus the LayerNorm)."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    width = config.hidden_size
    dense = lambda: _dense(width, width, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query, self.key, self.value, self.output = dense(), dense(), dense(), dense()
    self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.head_dim = width // config.num_attention_heads

  def __call__(self, hidden: Array, bias: Array | None) -> Array:
    batch, length, width = hidden.shape
    heads = lambda x: x.reshape(batch, length, self.num_heads, self.head_dim)
    query, key, value = heads(self.query(hidden)), heads(self.key(hidden)), heads(self.value(hidden))
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    if bias is not None:
      scores = scores + bias
    probs = self.dropout(jax.nn.softmax(scores, axis=-1))
    context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)
    return self.output(context.reshape(batch, length, width))


class BertLayer(nnx.Module):
  """Post-LayerNorm transformer block: attention, then the feed-forward, each with a residual."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = BertSelfAttention(config, **kw)
    self.attention_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
    self.attention_norm = _layer_norm(config, **kw)
    self.intermediate = _dense(config.hidden_size, config.intermediate_size, config, **kw)
    self.output = _dense(config.intermediate_size, config.hidden_size, config, **kw)
    self.output_dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
    self.output_norm = _layer_norm(config, **kw)
    self.activation = config.hidden_act

  def __call__(self, hidden: Array, bias: Array | None) -> Array:
    hidden = self.attention_norm(hidden + self.attention_dropout(self.attention(hidden, bias)))
    feed_forward = self.output(_ACTIVATIONS[self.activation](self.intermediate(hidden)))
    return self.output_norm(hidden + self.output_dropout(feed_forward))


class BertEncoder(nnx.Module):
  """The stack of BertLayers over an already embedded (B, L, H) sequence."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.layers = nnx.List([BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, hidden: Array, attention_mask: Array | None = None) -> Array:
    """`attention_mask` is (B, L), 1 for tokens to attend to and 0 for padding; None attends to all."""
    bias = None
    if attention_mask is not None:
      if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"BertEncoder: attention_mask has shape {attention_mask.shape} but the "
                         f"sequence is {hidden.shape[:2]} (batch, length); pass a (B, L) 1/0 mask.")
      bias = attention_bias(attention_mask)
    for layer in self.layers:
      hidden = layer(hidden, bias)
    return hidden


class BertPooler(nnx.Module):
  """tanh(Linear) of the [CLS] token, the sentence vector BERT's NSP head was trained on."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.dense = _dense(config.hidden_size, config.hidden_size, config, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, hidden: Array) -> Array:
    return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(nnx.Module):
  """Embeddings, encoder and (optionally) pooler, returning HF's output names."""

  def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = BertEmbeddings(config, **kw)
    self.encoder = BertEncoder(config, **kw)
    self.pooler = BertPooler(config, **kw) if add_pooling_layer else None

  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               position_ids: Array | None = None) -> dict[str, Array]:
    """`last_hidden_state` (B, L, H) and, with a pooler, `pooler_output` (B, H)."""
    hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds=inputs_embeds)
    hidden = self.encoder(hidden, attention_mask)
    outputs = {"last_hidden_state": hidden}
    if self.pooler is not None:
      outputs["pooler_output"] = self.pooler(hidden)
    return outputs


class BertForSequenceClassification(nnx.Module):
  """BertModel + dropout + Linear on the pooled output, as HF's class of the same name."""

  def __init__(self, config: BertConfig, num_labels: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if num_labels < 1:
      raise ValueError(f"BertForSequenceClassification: num_labels must be >= 1, got {num_labels}.")
    self.config = config
    self.num_labels = num_labels
    self.bert = BertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rate = (config.classifier_dropout if config.classifier_dropout is not None
            else config.hidden_dropout_prob)
    self.dropout = nnx.Dropout(rate, rngs=rngs)
    self.classifier = _dense(config.hidden_size, num_labels, config, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               position_ids: Array | None = None) -> dict[str, Array]:
    """The BertModel outputs plus float32 `logits` (B, num_labels), ready for a loss."""
    outputs = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds,
                        position_ids=position_ids)
    logits = self.classifier(self.dropout(outputs["pooler_output"]))
    return {**outputs, "logits": logits.astype(jnp.float32)}


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters; works on `nnx.eval_shape(...)` models without allocating."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _checkpoint_params(model: BertModel | BertForSequenceClassification
                       ) -> dict[str, tuple[nnx.Variable, bool]]:
  """HF tensor name (without `bert.`) -> (the NNX parameter it fills, is it a Linear kernel)."""
  table: dict[str, tuple[nnx.Variable, bool]] = {}

  def linear(name: str, layer: nnx.Linear):
    table[f"{name}.weight"] = (layer.kernel, True)  # torch stores (out, in); NNX (in, out).
    table[f"{name}.bias"] = (layer.bias, False)

  def norm(name: str, layer: nnx.LayerNorm):
    table[f"{name}.weight"] = (layer.scale, False)
    table[f"{name}.bias"] = (layer.bias, False)

  bert = model.bert if isinstance(model, BertForSequenceClassification) else model
  embeddings = bert.embeddings
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    table[f"embeddings.{name}.weight"] = (getattr(embeddings, name).embedding, False)
  norm("embeddings.LayerNorm", embeddings.layer_norm)
  for i, layer in enumerate(bert.encoder.layers):
    prefix = f"encoder.layer.{i}"
    linear(f"{prefix}.attention.self.query", layer.attention.query)
    linear(f"{prefix}.attention.self.key", layer.attention.key)
    linear(f"{prefix}.attention.self.value", layer.attention.value)
    linear(f"{prefix}.attention.output.dense", layer.attention.output)
    norm(f"{prefix}.attention.output.LayerNorm", layer.attention_norm)
    linear(f"{prefix}.intermediate.dense", layer.intermediate)
    linear(f"{prefix}.output.dense", layer.output)
    norm(f"{prefix}.output.LayerNorm", layer.output_norm)
  if bert.pooler is not None:
    linear("pooler.dense", bert.pooler.dense)
  if isinstance(model, BertForSequenceClassification):
    linear("classifier", model.classifier)
  return table


def _canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One naming for every BERT checkpoint: no `bert.` prefix, LayerNorm weight/bias not gamma/beta."""
  renamed = {}
  for name, value in hf.strip_prefix(tensors, ("bert.",)).items():
    # TF-converted checkpoints (e.g. the original bert-base-uncased .bin) say gamma/beta.
    if name.endswith("LayerNorm.gamma"):
      name = name[:-len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
      name = name[:-len("beta")] + "bias"
    renamed[name] = value
  return renamed


def cut(path: str, config: BertConfig, num_hidden_layers: int | None) -> BertConfig:
  """A checkpoint's config kept to its first `num_hidden_layers` layers (None: all of them): what
  `from_pretrained` builds, and what `jmmshap.models.architecture` records and checks first."""
  if num_hidden_layers is None:
    return config
  if not 1 <= num_hidden_layers <= config.num_hidden_layers:
    raise CheckpointError(f"{path}: num_hidden_layers={num_hidden_layers}, but the checkpoint has "
                          f"{config.num_hidden_layers} layers; keep between 1 and "
                          f"{config.num_hidden_layers}.")
  return dataclasses.replace(config, num_hidden_layers=num_hidden_layers)


def from_pretrained(path: str, hf_config: Mapping[str, Any], *, num_labels: int | None = None,
                    num_hidden_layers: int | None = None,
                    add_pooling_layer: bool = True, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None
                    ) -> tuple[BertModel | BertForSequenceClassification, BertConfig]:
  """Builds the model an HF BERT checkpoint folder describes and loads its weights.

  Returns (model, config) in eval mode, as transformers does; call `model.train()` to fine-tune.
  Without `num_labels` the result is a BertForSequenceClassification when the checkpoint has a
  `classifier` head and a BertModel otherwise. With `num_labels`, a head of another size (or none) is
  replaced by a freshly initialised one, drawn from `rngs` (default `nnx.Rngs(0)`).
  `num_hidden_layers` keeps only the first layers: a cheaper tower that still starts from pretrained
  weights (the lower layers of a BERT carry most of the lexical knowledge a short title needs).
  """
  model_type = hf_config.get("model_type")
  if model_type != "bert":
    raise CheckpointError(
        f"{path}: config.json has model_type={model_type!r}, not 'bert'. Load it with "
        "jmmshap.models.from_pretrained(path), which picks the model that config.json names.")
  try:
    config = BertConfig.from_hf(hf_config)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}/config.json: {e}") from e
  dropped_layers = ()
  if num_hidden_layers is not None and num_hidden_layers != config.num_hidden_layers:
    dropped_layers = tuple(f"encoder.layer.{i}." for i in range(num_hidden_layers,
                                                                config.num_hidden_layers))
    logger.info("%s: keeping the first %d of %d layers.", path, num_hidden_layers,
                config.num_hidden_layers)
    config = cut(path, config, num_hidden_layers)
  tensors = _canonical_names(hf.read_tensors(path))

  head = tensors.get("classifier.weight")
  head_labels = int(head.shape[0]) if head is not None and head.ndim == 2 else None
  if num_labels is None:
    num_labels = head_labels
  load_head = num_labels is not None and head_labels == num_labels
  if num_labels is not None and not load_head:
    if head_labels is None:
      logger.info("%s has no classifier: initialising a new %d-label classifier (train it before use).",
                  path, num_labels)
    else:
      logger.warning("%s has a %d-label classifier but num_labels=%d: it is dropped and a new "
                     "classifier initialised (train it before use).", path, head_labels, num_labels)
  ignored = (_BUFFERS + _PRETRAINING_HEADS + dropped_layers
             + (() if load_head else ("classifier.",)))
  skipped = sorted(k for k in tensors if k.startswith(_PRETRAINING_HEADS))
  if skipped:
    logger.info("%s: ignoring %d pre-training head tensors (%s ...).", path, len(skipped), skipped[0])

  if num_labels is not None and not add_pooling_layer:
    raise ValueError("BertForSequenceClassification classifies the pooled output; it needs the "
                     "pooling layer (drop add_pooling_layer=False or num_labels).")

  def build(rngs: nnx.Rngs) -> BertModel | BertForSequenceClassification:
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if num_labels is None:
      return BertModel(config, add_pooling_layer=add_pooling_layer, **kw)
    return BertForSequenceClassification(config, num_labels, **kw)

  # Check names and shapes against an abstract model: a bad checkpoint fails before any allocation.
  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  table = _checkpoint_params(abstract)
  fresh_head = num_labels is not None and not load_head
  expected = {k for k in table if not (fresh_head and k.startswith("classifier."))}
  hf.check_keys(path, expected, set(tensors), ignored_prefixes=ignored)
  for name in sorted(expected):
    variable, is_kernel = table[name]
    value = tensors[name]
    hf.check_shape(path, name, value, variable.shape[::-1] if is_kernel else variable.shape)
    variable.set_value(jnp.asarray(value.T if is_kernel else value, dtype=param_dtype))
  loaded = nnx.Param
  if fresh_head:
    loaded = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("classifier")))
  loaded_state = nnx.state(abstract, loaded)

  @nnx.jit
  def materialise(loaded_state: nnx.State, rngs: nnx.Rngs):
    # Flax's partial-initialisation idiom: the random init of every loaded parameter is dead code
    # that XLA drops, so only the fresh head and the dropout RNG streams are actually drawn.
    model = build(rngs)
    nnx.update(model, loaded_state)
    return model

  model = materialise(loaded_state, rngs if rngs is not None else nnx.Rngs(0))
  model.eval()
  return model, config


def encoder_from_pretrained(path: str, num_layers: int = 0, **kwargs: Any) -> BertModel:
  """The encoder of a HF BERT folder (a classifier's head dropped), cut to its first `num_layers`
  layers (0: all); keyword arguments as for `from_pretrained` (dtype, param_dtype, rngs)."""
  model, _ = from_pretrained(path, hf.read_config(path), num_hidden_layers=num_layers or None,
                             **kwargs)
  return model.bert if isinstance(model, BertForSequenceClassification) else model

