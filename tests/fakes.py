"""Synthetic inputs shared by tests (not a test module itself): a tiny MMBT with random weights and
batches for it; tiny HF CLIPModel, BertModel (with its vocab.txt) and ResNetModel checkpoints with
random weights; workdirs for the meta stage whose base learners' logits and MM-SHAP shares are
written as the stages write them."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from configs import meta as meta_configs
from jmmshap import workdir
from jmmshap.models import bert, clip_vision, mmbt
from jmmshap.builders import EVAL_SPLITS

CLS, SEP, MASK = 2, 3, 4  # The ids TitleTokenizer gives its special tokens.
LENGTH = 8
NUM_IMAGES = 2


def _build_tiny_mmbt(rngs: nnx.Rngs) -> mmbt.MMBT:
  text = bert.BertModel(bert.BertConfig(
      vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
      max_position_embeddings=32), rngs=rngs)
  vision = clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
      patch_size=8), rngs=rngs)
  config = mmbt.MMBTConfig(num_image_embeddings=NUM_IMAGES, cls_token_id=CLS, sep_token_id=SEP,
                           mask_token_id=MASK)
  return mmbt.MMBT(config, text, vision, num_labels=3, rngs=rngs)


def tiny_mmbt(seed: int = 0) -> mmbt.MMBT:
  """A tiny MMBT with weights drawn by numpy: `eval_shape` gives the structure without running
  (and, on a CPU, compiling) one initialiser per parameter, which took seconds."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _build_tiny_mmbt(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # Dropout streams, unused in eval.
      return jax.random.wrap_key_data(np.zeros(leaf.shape + (2,), np.uint32))
    name = path[-2].key
    if name == "count":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":  # LayerNorm.
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(scale=0.3, size=leaf.shape), leaf.dtype)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))
  model.eval()
  return model


def make_batch(words: list[list[int]], seed: int = 0, length: int = LENGTH) -> dict[str, np.ndarray]:
  """Examples whose word i has words[b][i] tokens: [CLS] tokens.. [SEP] [PAD].."""
  rng = np.random.default_rng(seed)
  size = len(words)
  input_ids = np.zeros((size, length), np.int32)
  word_ids = np.full((size, length), -1, np.int32)
  for row, pieces in enumerate(words):
    tokens = [w for w, count in enumerate(pieces) for _ in range(count)]
    input_ids[row, :len(tokens) + 2] = [CLS, *rng.integers(5, 40, len(tokens)), SEP]
    word_ids[row, 1:len(tokens) + 1] = tokens
  return {
      "input_ids": input_ids, "attention_mask": (input_ids > 0).astype(np.int32),
      "token_type_ids": np.zeros_like(input_ids), "word_ids": word_ids,
      "pixel_values": rng.normal(size=(size, 16, 16, 3)).astype(np.float32),
      "id": np.asarray([f"ex-{row}" for row in range(size)]),
  }


TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=32, patch_size=8)
TINY_CLIP_VOCAB = 64
TINY_CLIP_BOS = 3


def save_tiny_hf_clip(folder: str, eos_token_id: int = 2, seed: int = 0) -> torch.nn.Module:
  """A random-weight transformers CLIPModel saved to `folder`, returned in eval mode: non-trivial
  LayerNorms, positions and token embeddings, a temperature other than the init's. eos_token_id=2 is the legacy
  config (the end of text is the highest id, TINY_CLIP_VOCAB - 1), as in OpenAI's checkpoints."""
  torch.manual_seed(seed)
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              vocab_size=TINY_CLIP_VOCAB, max_position_embeddings=12, bos_token_id=TINY_CLIP_BOS,
              eos_token_id=eos_token_id, pad_token_id=0)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=8)).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.normal_(1.0, 0.2)
        module.bias.normal_(0.0, 0.2)
    model.text_model.embeddings.position_embedding.weight.normal_()
    model.text_model.embeddings.token_embedding.weight.normal_()  # Words that matter to the score.
    model.vision_model.embeddings.position_embedding.weight.normal_()
    model.logit_scale.fill_(1.3)
  model.save_pretrained(folder)
  return model


TINY_BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=128)


def save_tiny_hf_bert(folder: str, vocabulary: bool = True) -> str:
  """A random-weight transformers BertModel of TINY_BERT saved to `folder`, with a WordPiece
  vocab.txt of its 40 ids (the special tokens, then words) unless `vocabulary` is False."""
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(folder)
  if vocabulary:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"word{i}" for i in range(TINY_BERT["vocab_size"] - len(words))]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
      f.write("\n".join(words) + "\n")
  return folder


def save_tiny_hf_resnet(folder: str) -> str:
  """A random-weight transformers ResNetModel (one basic block per stage, 8 wide) saved to `folder`."""
  torch.manual_seed(0)
  transformers.ResNetModel(transformers.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
      layer_type="basic")).save_pretrained(folder)
  return folder


CLASS_NAMES = ("lamp", "mug", "design/red-circle", "design/blue-square")


def write_logits(root, learner, split, logits, labels, ids, class_names=CLASS_NAMES):
  os.makedirs(workdir.stage_dir(root, learner), exist_ok=True)
  np.savez(workdir.path(root, learner, workdir.logits_file(split)), logits=np.asarray(logits, np.float32),
           labels=np.asarray(labels, np.int32), ids=np.asarray(ids), class_names=np.asarray(class_names))


def write_shares(root, split, ids, t_shap, class_names=CLASS_NAMES):
  os.makedirs(workdir.stage_dir(root, "mmshap"), exist_ok=True)
  t_shap = np.asarray(t_shap, np.float64)
  np.savez(workdir.path(root, "mmshap", workdir.shares_file(split)), ids=np.asarray(ids), t_shap=t_shap,
           v_shap=1 - t_shap, class_names=np.asarray(class_names))


def fake_workdir(root, *, per_class=(6, 5), seed=0, mmbt_classes=(0, 1, 2, 3)):
  """Base learners each right on their own classes: text on 0-1, image on 2-3, mmbt on
  `mmbt_classes` (all four by default, where it is right on most examples); noise elsewhere."""
  rng = np.random.default_rng(seed)
  num_classes = len(CLASS_NAMES)
  for split, count in zip(EVAL_SPLITS, per_class, strict=True):
    labels = np.repeat(np.arange(num_classes), count)
    ids = np.asarray([f"{split}-{i}" for i in range(len(labels))])
    onehot = np.eye(num_classes)[labels]
    text = 4 * onehot * (labels < 2)[:, None] + rng.normal(size=onehot.shape)
    image = 4 * onehot * (labels >= 2)[:, None] + rng.normal(size=onehot.shape)
    mmbt = 2 * onehot * np.isin(labels, mmbt_classes)[:, None] + rng.normal(size=onehot.shape)
    for learner, logits in (("text", text), ("image", image), ("mmbt", mmbt)):
      write_logits(root, learner, split, logits, labels, ids)
    write_shares(root, split, ids, np.where(labels < 2, 0.8, 0.3))
  return root


def meta_config(**meta_overrides):
  """The toyshop meta config, small; one member per meta-model (cross_fit=0) unless overridden."""
  config = meta_configs.get_config("toyshop")
  config.meta.update(hidden_size=16, num_steps=40, eval_every_steps=20, checkpoint_every_steps=20,
                     log_every_steps=10, cross_fit=0)
  config.meta.update(meta_overrides)
  return config


def as_if_killed_after_checkpoint(stage_dir: str, later_step: int) -> None:
  """Make a finished stage folder look killed before the checkpoint of `later_step`: that
  checkpoint and the stage's final outputs never happened, so a rerun resumes from the one before."""
  shutil.rmtree(os.path.join(stage_dir, "checkpoints", str(later_step)))
  for name in ("metrics.json", "logits_validation.npz", "logits_test.npz"):
    os.remove(os.path.join(stage_dir, name))
