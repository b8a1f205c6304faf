r"""The train step fed by the real input pipeline, next to the same step alone: how long the device
waits for input.

  PYTHONPATH=. python scripts/bench_train_input.py --dtype=bfloat16 --out=train_input.json  # a GPU host
  PYTHONPATH=. python scripts/bench_train_input.py --small --out=/tmp/train_input.json        # CPU smoke

(`scripts/bench_gpu.sh` runs it as its `input` part.) Cases, at the paper's sizes:
  resnet152_train_b128   ResNet-152 train step on 224 px photos
  mmbt_train_b64         CLIP-MMBT (ViT-B/32, BERT-base) train step on 288 px photos, 120 tokens

Both run what the stages run: `classifier.make_loss` inside `train_lib.make_train_step`, with the
photos crossing as uint8 and normalised, cropped and flipped on the device
(`photos.PhotoTransform.training`), jitted with train_lib's shardings. "alone" times the step on
one uint8 batch already on the devices; "with input" times the same program fed by
`input_pipeline.loader`: grain reads, decodes (PIL, with JPEG draft scaling) and tokenises
products in `--workers` processes, a thread copies each batch to the devices while the step runs.
The products are generated JPEGs of `--photo_size` (default about 1,000 x 1,300 px, e-commerce
photo sizes) with short titles, held in memory, so no disk is timed. input_wait_fraction =
1 - alone / with input: the share of a step the device spends waiting for the host.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence

import argparse
import sys
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
from flax import nnx
from PIL import Image

# A sibling script (scripts/ is on sys.path when this file runs): the paper-size model workloads.
import bench_models

from jmmshap import classifier, input_pipeline, parallel, photos, train_lib
from jmmshap.tokenizer import TitleTokenizer

TITLE_WORDS = "red blue green black white cotton linen shirt dress shoe bag watch lamp mug".split()


def products(count: int, size: tuple[int, int], seed: int = 0) -> list[dict]:
  """Generated products: a smooth random photo with texture (JPEG, quality 90) and a title."""
  rng = np.random.default_rng(seed)
  width, height = size
  rows, columns = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  records = []
  for i in range(min(count, 64)):
    phase = rng.uniform(0, 2 * np.pi, 3)
    picture = np.stack([np.sin(6 * rows + phase[c]) * np.cos(4 * columns + phase[c])
                        for c in range(3)], -1)
    picture = (picture * 100 + 128 + rng.normal(0, 12, picture.shape)).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(picture.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    records.append(buffer.getvalue())
  return [{"id": f"p{i}", "title": " ".join(rng.choice(TITLE_WORDS, 6)).encode(),
           "image": records[i % len(records)], "label": int(i % 10)} for i in range(count)]


def case_settings(small: bool) -> dict[str, dict]:
  sizes = bench_models.Sizes(small=small, bert_length=128, resnet_image_size=224,
                             mmbt_image_size=288, mmbt_text_length=120, num_labels=10)
  resnet = bench_models.resnet_workload(sizes)
  mmbt = bench_models.mmbt_workload(sizes)
  return {
      "resnet152_train_b128": {"workload": resnet, "batch_size": 16 if small else 128,
                               "image_size": resnet.shapes["image_size"], "text_length": None},
      "mmbt_train_b64": {"workload": mmbt, "batch_size": 16 if small else 64,
                         "image_size": mmbt.shapes["image_size"],
                         "text_length": mmbt.shapes["text_length"]},
  }


def time_steps(step, state, batches, count: int) -> tuple[float, float, object]:
  """(seconds per step, seconds per step spent waiting in next(batches), state) over `count`."""
  waited = 0.0
  metrics = None
  start = time.perf_counter()
  for _ in range(count):
    before = time.perf_counter()
    batch = next(batches)
    waited += time.perf_counter() - before
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / count, waited / count, state


def run_case(name: str, settings: dict, records: list[dict], workers: Sequence[int],
             dtype: jnp.dtype, steps: int, photo_size: Sequence[int]) -> list[dict]:
  mesh = parallel.make_mesh()
  workload, batch_size = settings["workload"], settings["batch_size"]
  model = workload.build(dtype, nnx.Rngs(0))
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  config = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-4, weight_decay=0.01,
                                          warmup_fraction=0.1, schedule="cosine"))
  optimizer, _ = train_lib.make_optimizer(config, total_steps=10_000)
  transform = photos.PhotoTransform(augmentation=photos.Augmentation(flip=True,
                                                                     crop_area=(0.35, 1.0)))
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  step = jax.jit(train_lib.make_train_step(classifier.make_loss(graphdef, workload.inputs),
                                           optimizer, prepare_batch=transform.training),
                 in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                 donate_argnums=0)
  state = parallel.replicate({"step": jnp.zeros((), jnp.int32), "params": params,
                              "model_state": model_state, "opt_state": optimizer.init(params)}, mesh)
  tokenizer = None
  if settings["text_length"]:
    tokenizer = TitleTokenizer.train([r["title"].decode() for r in records[:256]], vocab_size=200,
                                     max_length=settings["text_length"])
  preprocess = input_pipeline.Preprocessor(tokenizer, settings["image_size"])
  fixed = parallel.to_global(preprocess(records[:batch_size // jax.process_count()]), mesh)
  endless = iter(lambda: fixed, None)
  warmup = 3
  _, _, state = time_steps(step, state, endless, warmup)  # Compiles.
  alone, _, state = time_steps(step, state, endless, steps)
  rows = []
  order = input_pipeline.TrainOrder(len(records), batch_size, seed=0)
  for count in workers:
    started = time.perf_counter()
    batches = input_pipeline.loader(records, preprocess, order, global_batch_size=batch_size,
                                    start=0, stop=warmup + steps, worker_count=count,
                                    transform=lambda batch: parallel.to_global(batch, mesh))
    try:
      _, _, state = time_steps(step, state, batches, warmup)
      startup = time.perf_counter() - started
      fed, waited, state = time_steps(step, state, batches, steps)
    finally:
      batches.close()
    rows.append({
        "case": name, "batch_size": batch_size, "image_size": settings["image_size"],
        "text_length": settings["text_length"], "worker_count": count,
        "photo_size": list(photo_size), "dtype": str(np.dtype(dtype)),
        "step_alone_s": alone, "step_with_input_s": fed, "waiting_in_next_s": waited,
        "input_wait_fraction": max(0.0, 1.0 - alone / fed),
        "images_per_s_alone": batch_size / alone, "images_per_s_with_input": batch_size / fed,
        "startup_s": startup})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="Tiny models and photos: a CPU smoke run.")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--workers", default=None,
                      help="grain worker counts to time, comma-separated (default 0,4,8,15; "
                           "0,1 with --small)")
  parser.add_argument("--steps", type=int, default=30, help="Timed steps per case (after 3 warm-up).")
  parser.add_argument("--products", type=int, default=1024, help="Generated products.")
  parser.add_argument("--photo_size", default="1000,1300", help="Generated photos' width,height.")
  parser.add_argument("--out", required=True, help="JSON file to write.")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  size = (64, 80) if args.small else tuple(int(v) for v in args.photo_size.split(","))
  records = products(args.products, size)
  workers = [int(w) for w in (args.workers or ("0,1" if args.small else "0,4,8,15")).split(",")]
  rows = []
  for name, settings in case_settings(args.small).items():
    rows.extend(run_case(name, settings, records, workers, dtype, args.steps, size))
  result = {"environment": bench_models.environment(), "host_cpus": os.cpu_count(), "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print("| case | workers | step alone (s) | with input (s) | waiting for input |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['case']} | {row['worker_count']} | {row['step_alone_s']:.4f} | "
          f"{row['step_with_input_s']:.4f} | {100 * row['input_wait_fraction']:.0f}% |")


if __name__ == "__main__":
  main(sys.argv[1:])
