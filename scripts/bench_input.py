r"""The host input pipeline alone (no model): images/s and titles/s of the grain pipeline ("new")
against the per-photo work the pipeline did before it ("old"), at several photo sizes.

  PYTHONPATH=. python scripts/bench_input.py --output=docs/benchmarks/input_pipeline.json

Why: the new pipeline decodes JPEGs at a reduced DCT scale (PIL `draft`), keeps photos uint8 and
normalises them on the device, and can spread batches over grain worker processes. This records
what each of those buys on the fashion catalogue (~60x80 JPEGs), on generated ~1000x1300 JPEGs
("large"), and on those JPEGs stored pre-shrunk to 288 px ("large_bounded288"), plus the titles
alone at 120 tokens. "old" is one thread: full-size decode, PIL resize, float32 normalise. New
rows are steady throughput, start-up excluded (see `time_new`; `startup_s` is the fixed cost,
`first_batch_s` the wait for the first batch); the load average at the start of each case is
recorded, since the machine may be shared.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from configs import common
from jmmshap import builders, input_pipeline, photos
from jmmshap.input_pipeline import Preprocessor, TrainOrder
from jmmshap.tokenizer import TitleTokenizer

_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks/input_pipeline.json", "JSON to write.")
_TABLE = flags.DEFINE_string("table", "/tmp/bench_input_table.md", "Markdown table to write.")
_SIZES = flags.DEFINE_list("sizes", ["64", "224", "288"], "Photo sizes (px).")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "grain worker counts of the new pipeline.")
_READ_THREADS = flags.DEFINE_list("read_threads", ["1", "2"],
                                  "Read threads of the new pipeline without workers (worker_count 0).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny counts: a smoke test, not a measurement.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared-data cache (None: TFDS's default).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/jmmshap_bench_input"),
                                 "Where the generated large-JPEG product folders are kept.")
_SECONDS = flags.DEFINE_float("seconds", 12.0, "Target seconds of a case on one thread.")

LARGE_SIZE = (1000, 1300)  # (width, height) of the generated photos.
BOUND = 288  # Longer side of the "bounded storage" copies.
TEXT_LENGTH = 120


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def _large_photo(rng: np.random.Generator) -> np.ndarray:
  """Smooth colour fields with a woven stripe and mild grain: photo-like JPEG entropy."""
  width, height = LARGE_SIZE
  base = Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)).resize(
      (width, height), Image.BICUBIC)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  fx, fy = rng.uniform(0.02, 0.15, 2)
  texture = 10 * np.sin(2 * np.pi * (x * fx + y * fy)) + rng.normal(0, 2, (height, width))
  return np.clip(np.asarray(base, np.float32) + texture[..., None], 0, 255).astype(np.uint8)


def _write_folder(folder: str, photos_by_id: dict[str, bytes]) -> None:
  """A product_folder catalogue: products.csv (id, text, label, split) + images/<id>.jpg; the
  first 8 products are validation, the next 8 test, the rest train."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  for product_id, data in photos_by_id.items():
    with open(os.path.join(folder, "images", f"{product_id}.jpg"), "wb") as f:
      f.write(data)
  with open(os.path.join(folder, "products.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "text", "label", "split"])
    for i, product_id in enumerate(photos_by_id):
      split = "validation" if i < 8 else "test" if i < 16 else "train"
      writer.writerow([product_id, f"generated product {i} in colour {i % 7}", f"c{i % 4}", split])


def large_folders(count: int) -> dict[str, str]:
  """{"large": folder, "large_bounded288": folder}, generated once into --cache_dir."""
  folders = {name: os.path.join(_CACHE_DIR.value, f"{name}_{count}")
             for name in ("large", f"large_bounded{BOUND}")}
  if not all(os.path.isfile(os.path.join(f, "products.csv")) for f in folders.values()):
    rng = np.random.default_rng(0)
    large = {f"p{i:04d}": _jpeg(_large_photo(rng)) for i in range(count + 16)}
    bounded = {}
    for product_id, data in large.items():
      with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((BOUND, BOUND), Image.LANCZOS)
        bounded[product_id] = _jpeg(np.asarray(image.convert("RGB")))
    _write_folder(folders["large"], large)
    _write_folder(folders[f"large_bounded{BOUND}"], bounded)
  return folders


def train_source(data_config: Any) -> Any:
  data_config.data_dir = _DATA_DIR.value
  return builders.data_source(builders.prepare(data_config), "train")


def old_batch(records: Sequence[dict], tokenizer: TitleTokenizer | None, size: int | None
              ) -> dict[str, np.ndarray]:
  """What the pre-grain Preprocessor did per batch: full-size decode, PIL bilinear resize,
  float32 normalise on the host."""
  batch = {"label": np.asarray([int(r["label"]) for r in records], np.int32),
           "id": np.asarray([input_pipeline.as_text(r["id"]) for r in records])}
  if tokenizer is not None:
    batch.update(tokenizer([input_pipeline.as_text(r["title"]) for r in records]))
  if size:
    mean = np.asarray(photos.IMAGENET_MEAN, np.float32)
    std = np.asarray(photos.IMAGENET_STD, np.float32)
    pixels = []
    for r in records:
      array = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
      if array.shape[:2] != (size, size):
        array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
      pixels.append((array.astype(np.float32) / 255.0 - mean) / std)
    batch["pixel_values"] = np.stack(pixels)
  return batch


def time_old(source: Any, order: TrainOrder, batches: int,
             work: Callable[[Sequence[dict]], Any]) -> dict[str, Any]:
  start = time.perf_counter()
  for b in range(batches):
    work(input_pipeline.read_records(source, order(b)))
  return {"batches": batches, "seconds": time.perf_counter() - start}


def run_new(source: Any, preprocess: Preprocessor, order: TrainOrder, batches: int,
            workers: int, threads: int | None) -> tuple[float, float]:
  """(seconds to the first batch, seconds to the last) of a fresh loader over `batches`."""
  start = time.perf_counter()
  iterator = input_pipeline.loader(source, preprocess, order, start=0, stop=batches,
                                   global_batch_size=order.global_batch_size,
                                   worker_count=workers, read_threads=threads)
  try:
    next(iterator)
    first = time.perf_counter() - start
    count = 1 + sum(1 for _ in iterator)
  finally:
    iterator.close()
  assert count == batches, (count, batches)
  return first, time.perf_counter() - start


def time_new(source: Any, preprocess: Preprocessor, order: TrainOrder, batches: int,
             workers: int, threads: int | None, quick: bool) -> dict[str, Any]:
  """Steady throughput as the difference of a long and a short run: the first batches arrive
  together with the ones read ahead, so "after the first batch" would leave them out; the
  difference drops the start-up (worker spawn, imports, pipeline fill) whatever it is."""
  short = 2 if quick else max(2 * (workers + 1), batches // 4)
  _, short_s = run_new(source, preprocess, order, short, workers, threads)
  first_s, long_s = run_new(source, preprocess, order, batches, workers, threads)
  seconds = long_s - short_s
  return {"batches": batches - short, "seconds": seconds, "first_batch_s": first_s,
          "startup_s": long_s - seconds * batches / (batches - short),
          "batches_long_run": batches, "seconds_long_run": long_s,
          "images_per_s_with_startup": round(batches * order.global_batch_size / long_s, 1)}


def cases(dataset: str, source: Any, size: int | None, tokenizer: TitleTokenizer | None,
          batch: int, workers: Sequence[tuple[int, int | None]], quick: bool,
          old: bool = True) -> list[dict]:
  """Rows of one dataset and size: the new pipeline at each worker count, then old (one thread).
  The batch counts aim at --seconds on one thread, from the best of two calibration batches of
  each, called in this thread (`one_thread_*_per_s`: the per-photo work without parallelism)."""
  order = TrainOrder(len(source), batch, seed=0)
  new = Preprocessor(tokenizer, size)
  plans: list[tuple[str, tuple[int, int | None], Callable[[], dict]]] = []
  one_thread: dict[str, float] = {}
  for pipeline, work in (("new", new), ("old", lambda r: old_batch(r, tokenizer, size))):
    if pipeline == "old" and not old:
      continue
    records = input_pipeline.read_records(source, order(0))
    work(records)  # Warm the page cache and the code paths.
    rate = 0.0
    for _ in range(2):
      start = time.perf_counter()
      work(records)
      rate = max(rate, batch / (time.perf_counter() - start))
    one_thread[pipeline] = round(rate, 1)
    least = 16 if pipeline == "new" else 3
    count = 4 if quick else int(np.clip(round(_SECONDS.value * rate / batch), least, 400))
    if pipeline == "new":
      plans += [("new", (w, t), lambda w=w, t=t, c=count: time_new(source, new, order, c, w, t,
                                                                  quick))
                for w, t in workers]
    else:
      plans.append(("old", (0, 1), lambda c=count, work=work: time_old(source, order, c, work)))
  rows = []
  for pipeline, (w, t), run in plans:
    load = os.getloadavg()
    row = {"dataset": dataset, "image_size": size, "worker_count": w,
           "read_threads": t if not w else None, "pipeline": pipeline,
           "batch_size": batch, "loadavg_at_start": [round(x, 2) for x in load], **run()}
    rate = round(row["batches"] * batch / row["seconds"], 1)
    row["images_per_s" if size else "examples_per_s"] = rate
    row["one_thread_images_per_s" if size else "one_thread_examples_per_s"] = one_thread[pipeline]
    if size:
      row["bytes_per_photo"] = size * size * 3 * (1 if pipeline == "new" else 4)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def table(rows: Sequence[dict]) -> str:
  """Markdown; the ratio is to the old pipeline at the same size on the same photos (for the
  bounded copies: on the original large photos, i.e. old storage + old pipeline)."""
  rate = lambda r: r.get("images_per_s") or r.get("examples_per_s")
  old = {(r["dataset"], r["image_size"]): rate(r) for r in rows if r["pipeline"] == "old"}
  lines = ["| dataset | size | pipeline | workers (threads) | images/s (titles: examples/s) | "
           "ratio to old |",
           "| --- | ---: | --- | ---: | ---: | ---: |"]
  for r in rows:
    base = old.get((r["dataset"].replace(f"_bounded{BOUND}", ""), r["image_size"]))
    ratio = f"{rate(r) / base:.2f}" if base else ""
    lines.append(f"| {r['dataset']} | {r['image_size'] or '-'} | {r['pipeline']} | "
                 f"{_workers(r)} | {rate(r):.0f} | {ratio} |")
  return "\n".join(lines) + "\n"


def _workers(row: dict) -> str:
  threads = row.get("read_threads")
  return f"{row['worker_count']} ({threads} thread{'s' if threads > 1 else ''})" if threads else str(
      row["worker_count"])


def mean_bytes(source: Any, count: int = 200) -> float:
  return float(np.mean([len(source[i]["image"]) for i in range(min(count, len(source)))]))


def main(argv: Sequence[str]) -> None:
  del argv
  began = time.perf_counter()
  quick = _QUICK.value
  sizes = [int(s) for s in _SIZES.value]
  workers = ([(0, int(t)) for t in _READ_THREADS.value]
             + [(int(w), None) for w in _WORKERS.value if int(w) > 0])
  fashion = train_source(common.data_config("fashion"))
  sources = {"fashion": fashion}
  for name, folder in large_folders(48 if quick else 512).items():
    config = common.data_config("taimd17k")
    config.manual_dir = folder
    sources[name] = train_source(config)
  try:
    tokenizer = TitleTokenizer.from_folder(common.MINILM, max_length=TEXT_LENGTH)
    tokenizer_name = common.MINILM
  except (ImportError, FileNotFoundError, ValueError):
    titles = [input_pipeline.as_text(fashion[i]["title"]) for i in range(len(fashion))]
    tokenizer = TitleTokenizer.train(titles, vocab_size=8000, max_length=TEXT_LENGTH)
    tokenizer_name = "trained on the fashion train titles, vocab 8000"
  rows: list[dict] = []
  for name, source in sources.items():
    for size in sizes:
      batch = 32 if quick else 128 if name == "large" and size >= 288 else 256
      rows += cases(name, source, size, None, batch, workers, quick,
                    old=not name.endswith(f"bounded{BOUND}"))
  rows += cases("fashion_titles", fashion, None, tokenizer, 32 if quick else 256, workers, quick)
  record = {
      "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                  **{p: metadata.version(p) for p in ("jax", "grain", "pillow", "tokenizers")}},
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": quick, "tokenizer": tokenizer_name, "text_max_length": TEXT_LENGTH,
      "datasets": {name: {"train_examples": len(s), "mean_encoded_bytes": mean_bytes(s)}
                   for name, s in sources.items()},
      "large_photo_px": list(LARGE_SIZE), "bound_px": BOUND,
      "total_seconds": round(time.perf_counter() - began, 1), "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=1)
  text = table(rows)
  with open(_TABLE.value, "w") as f:
    f.write(text)
  print(text)
  print(f"total {record['total_seconds']} s")


if __name__ == "__main__":
  app.run(main)
