r"""What the data checks cost on a real catalogue: reading the CSV (with the containment check of
every image path) and the images' fingerprint, against a plain csv.reader pass.

  python scripts/bench_catalog.py --manual_dir=../shared/data/fashion-products \
      --output=docs/benchmarks/catalog_check.json
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time

from absl import app, flags

from jmmshap import catalog

_MANUAL_DIR = flags.DEFINE_string("manual_dir", "../shared/data/fashion-products",
                                  "A fashion-products folder (products.csv + images/).")
_OUTPUT = flags.DEFINE_string("output", "catalog_check.json", "Where the JSON record goes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")


def _median_seconds(function, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    function()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main(argv) -> None:
  del argv
  manual_dir = _MANUAL_DIR.value
  csv_path = os.path.join(manual_dir, catalog.FASHION_CSV)

  def plain_csv():
    with open(csv_path, newline="", encoding="utf-8") as f:
      return sum(1 for _ in csv.reader(f))

  products = catalog.fashion_catalog(manual_dir, "article_type")
  image_dir = catalog.fashion_image_dir(manual_dir)
  record = {
      "catalogue": os.path.abspath(manual_dir), "rows": len(products.rows),
      "bad_rows": len(products.bad_rows),
      "seconds": {
          "plain_csv_reader": _median_seconds(plain_csv, _REPEATS.value),
          "read_catalog_with_checks": _median_seconds(
              lambda: catalog.fashion_catalog(manual_dir, "article_type"), _REPEATS.value),
          "images_fingerprint": _median_seconds(
              lambda: catalog.images_fingerprint(image_dir, products.rows), _REPEATS.value)},
      "repeats": _REPEATS.value, "cpus": os.cpu_count(), "python": platform.python_version(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  app.run(main)
