"""Times exact MM-SHAP of a CLIP-MMBT against a reference-style loop, at p = 8, 12, 16 players.

  PYTHONPATH=. python scripts/bench_mmshap.py --dtype=bfloat16 --output=bench_mmshap.json   # a GPU
  PYTHONPATH=. python scripts/bench_mmshap.py --small                                        # a CPU

The model has random weights at BERT-base size (768 wide, 12 layers, 12 heads) with a CLIP ViT-B/32
tower at 224 px and 4 image embeddings; titles are padded to L = 128 tokens, which they fill, split
into p - 4 words (the cost of a forward does not depend on the split). `--small` shrinks all of it
to run on a CPU in about a minute.

Engine: `mmshap.Explainer`: the vision tower once per example, then the 2**p coalitions in chunks
of `--chunk_size` rows, one compiled forward. Baseline, as the public MM-SHAP code evaluates a game:
one masked input per forward call, in a Python loop, through the whole model (vision tower
included), jitted at batch 1; its outputs are not read back until the loop ends, so dispatch
overlaps compute. The baseline is timed on `--baseline_coalitions` coalitions and extrapolated.
Every timing excludes compilation (a warm-up call first) and is the median of `--repeats` runs.
At the smallest p the baseline evaluates every coalition, and its phi is compared with the engine's.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from timing import median_seconds  # scripts/timing.py

from jmmshap import mmshap, shapley
from jmmshap.models import bert, clip_vision, mmbt

_OUTPUT = flags.DEFINE_string("output", "bench_mmshap.json", "Where to write the JSON results.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny model and inputs, for a CPU.")
_PLAYERS = flags.DEFINE_list("players", ["8", "12", "16"], "Player counts (text words + 4 images).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1024, "Coalition rows per forward call (at most).")
_EXAMPLES = flags.DEFINE_integer("examples", 1, "Examples explained per timed run.")
_BASELINE_COALITIONS = flags.DEFINE_integer("baseline_coalitions", 256,
                                            "Coalitions the baseline loop is timed on.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the median is kept; "
                                "2 with --small unless given).")

NUM_IMAGES = 4
NUM_LABELS = 31
CLS, SEP, MASK = 101, 102, 103


def sizes(small: bool) -> dict:
  if small:
    return dict(bert=bert.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64),
                clip=clip_vision.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=4,
                                                  image_size=32, patch_size=8),
                length=24)
  return dict(bert=bert.BertConfig.base(), clip=clip_vision.CLIPVisionConfig(), length=128)


def build_model(model_sizes: dict, dtype: jnp.dtype) -> mmbt.MMBT:
  @nnx.jit
  def create(key):  # One compiled program for every initialiser.
    rngs = nnx.Rngs(key)
    kwargs = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    text = bert.BertModel(model_sizes["bert"], **kwargs)
    vision = clip_vision.CLIPVisionModel(model_sizes["clip"], **kwargs)
    config = mmbt.MMBTConfig(num_image_embeddings=NUM_IMAGES, cls_token_id=CLS, sep_token_id=SEP,
                             mask_token_id=MASK)
    return mmbt.MMBT(config, text, vision, NUM_LABELS, **kwargs)

  model = create(jax.random.key(0))
  model.eval()
  return model


def make_batch(num_examples: int, num_words: int, length: int, image_size: int,
               vocab_size: int) -> dict[str, np.ndarray]:
  """Titles that fill all L - 2 text positions, split into `num_words` words."""
  rng = np.random.default_rng(0)
  tokens = length - 2
  input_ids = np.full((num_examples, length), SEP, np.int32)
  input_ids[:, 0] = CLS
  input_ids[:, 1:-1] = rng.integers(1000 if vocab_size > 2000 else 5, vocab_size,
                                    (num_examples, tokens))
  word_ids = np.full((num_examples, length), -1, np.int32)
  word_ids[:, 1:-1] = np.arange(tokens) * num_words // tokens
  return {
      "input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
      "token_type_ids": np.zeros_like(input_ids), "word_ids": word_ids,
      "pixel_values": rng.normal(size=(num_examples, image_size, image_size, 3)).astype(np.float32),
  }


def baseline_loop(model: mmbt.MMBT, batch: dict[str, np.ndarray], num_players: int,
                  coalitions: int) -> Callable[[], np.ndarray]:
  """The reference-style game: one masked input per jitted batch-1 forward of the whole model."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)  # Flat arrays: no pytree or graphdef work per call.

  @jax.jit
  def forward(leaves, input_ids, attention_mask, token_type_ids, pixel_values, text_keep,
              image_keep):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return model(input_ids, attention_mask, token_type_ids, pixel_values, text_keep=text_keep,
                 image_keep=image_keep)["logits"][0]

  player_of_token, num_text = mmshap.text_players(batch["word_ids"][:1])
  inputs = [jnp.asarray(batch[k][:1]) for k in ("input_ids", "attention_mask", "token_type_ids",
                                                "pixel_values")]
  tokens, text_count = player_of_token[0], int(num_text[0])

  def run():
    outputs = []
    for coalition in range(coalitions):
      mask = (coalition >> np.arange(num_players)) & 1 == 1
      text_keep = ((tokens < 0) | mask[np.maximum(tokens, 0)])[None]
      image_keep = mask[text_count:][None]
      outputs.append(forward(leaves, *inputs, text_keep, image_keep))
    return jnp.stack(outputs)

  return run


def repeats() -> int:
  return 2 if _SMALL.value and not flags.FLAGS["repeats"].present else _REPEATS.value


def bench(model: mmbt.MMBT, model_sizes: dict, num_players: int, dtype_name: str) -> dict:
  devices = jax.device_count()
  examples = _EXAMPLES.value
  coalitions = 1 << num_players
  chunk = min(_CHUNK_SIZE.value, coalitions * examples)
  chunk = max(devices, chunk - chunk % devices)
  group = -(-examples // devices) * devices
  batch = make_batch(examples, num_players - NUM_IMAGES, model_sizes["length"],
                     model_sizes["clip"].image_size, model_sizes["bert"].vocab_size)
  explainer = mmshap.Explainer(model, mmshap.Options(chunk_size=chunk, examples_per_group=group,
                                                     max_exact_players=num_players))
  # Warm-up on a game of one chunk: the same compiled program (its shapes depend on L and the
  # chunk, not on p), without paying for a whole 2**16 game.
  warm_up_words = max(1, min(num_players, chunk.bit_length() - 1) - NUM_IMAGES)
  explainer.explain(make_batch(examples, warm_up_words, model_sizes["length"],
                               model_sizes["clip"].image_size, model_sizes["bert"].vocab_size))
  results = []
  engine_seconds = median_seconds(lambda: results.append(explainer.explain(batch)),
                                  repeats(), warm_up=False)
  result = results[0]
  assert result.exact.all() and (result.num_evaluations == coalitions).all()

  baseline_count = min(_BASELINE_COALITIONS.value, coalitions)
  run_baseline = baseline_loop(model, batch, num_players, baseline_count)
  baseline_seconds = median_seconds(run_baseline, repeats())
  baseline_rate = baseline_count / baseline_seconds
  row = {
      "num_players": num_players, "text_players": num_players - NUM_IMAGES,
      "coalitions_per_example": coalitions, "examples": examples, "chunk_size": chunk,
      "engine_seconds_per_example": engine_seconds / examples,
      "engine_coalitions_per_s": coalitions * examples / engine_seconds,
      "baseline_coalitions_timed": baseline_count,
      "baseline_coalitions_per_s": baseline_rate,
      "baseline_seconds_per_example": coalitions / baseline_rate,
      "speedup": (coalitions * examples / engine_seconds) / baseline_rate,
      "dtype": dtype_name,
  }
  if baseline_count == coalitions:  # The whole game: the two must give the same phi.
    table = np.asarray(run_baseline(), np.float64)
    target = int(result.targets[0])
    phi = shapley.shapley_from_values(table[:, target])
    difference = np.abs(phi - result.phi[0, :num_players])
    row["max_abs_phi_difference_vs_baseline"] = float(np.max(difference))
    row["max_abs_phi"] = float(np.max(np.abs(phi)))
  return row


def main(argv: list[str]) -> None:
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  model_sizes = sizes(_SMALL.value)
  model = build_model(model_sizes, dtype)
  rows = [bench(model, model_sizes, int(p), _DTYPE.value) for p in _PLAYERS.value]
  results = {
      "device": str(jax.devices()[0]), "device_count": jax.device_count(),
      "jax_version": jax.__version__, "python": platform.python_version(), "small": _SMALL.value,
      "length": model_sizes["length"], "bert": str(model_sizes["bert"]),
      "clip": str(model_sizes["clip"]), "repeats": repeats(), "results": rows,
  }
  with open(_OUTPUT.value, "w") as f:
    json.dump(results, f, indent=2)
  print(f"device {results['device']} x{results['device_count']}, jax {results['jax_version']}, "
        f"{_DTYPE.value}, L={model_sizes['length']}, median of {repeats()} runs")
  for row in rows:
    check = (f", max |phi diff| {row['max_abs_phi_difference_vs_baseline']:.1e} "
             f"(max |phi| {row['max_abs_phi']:.1e})" if "max_abs_phi" in row else "")
    print(f"p={row['num_players']:2d} ({row['coalitions_per_example']:>6,} coalitions): "
          f"engine {row['engine_seconds_per_example']:8.3f} s/example, "
          f"{row['engine_coalitions_per_s']:>9,.0f} coalitions/s (chunk {row['chunk_size']}); "
          f"baseline {row['baseline_seconds_per_example']:8.2f} s/example, "
          f"{row['baseline_coalitions_per_s']:>7,.0f} coalitions/s; "
          f"speedup {row['speedup']:.1f}x{check}")
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
