r"""Prediction throughput of a finished workdir: products/s with and without MM-SHAP explanations.

  PYTHONPATH=. python scripts/toyshop_products.py --workdir=W --output=DIR --count=600
  PYTHONPATH=. python scripts/bench_predict.py --workdir=W --input=DIR \
      --output=docs/benchmarks/predict_toyshop.json

Loads the predictor once (timed), reads the products (timed: CSV, containment and decoding every
photo), then per mode (`explain`: MM-SHAP, sample weighting; `no_explain`: dataset weighting only)
one cold call (its compilation included) and `--repeats` warm calls of `Predictor.predict` on all
products; products/s is the products over the median warm call. Writing the output folder is timed
once per mode (CSV, and with explanations mmshap.npz, the HTML page and `--max_cards` PNGs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import jax
from absl import app, flags

from jmmshap import launch, predictor as predictor_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished workdir.")
_INPUT = flags.DEFINE_string("input", None, "A product folder (products.csv + images/).")
_OUTPUT = flags.DEFINE_string("output", "predict_bench.json", "Where the JSON record goes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm calls per mode; the median is reported.")
_MAX_CARDS = flags.DEFINE_integer("max_cards", 200, "Cards rendered when writing (0: all).")
flags.mark_flags_as_required(["workdir", "input"])


def _timed(function):
  started = time.perf_counter()
  value = function()
  return value, time.perf_counter() - started


def main(argv) -> None:
  del argv
  launch.start()
  predictor, load_s = _timed(lambda: predictor_lib.Predictor.load(_WORKDIR.value))
  products, read_s = _timed(lambda: predictor.read(_INPUT.value))
  record = {"workdir": os.path.abspath(_WORKDIR.value), "input": os.path.abspath(_INPUT.value),
            "products": len(products), "load_s": load_s, "read_s": read_s, "modes": {},
            "repeats": _REPEATS.value, "devices": [str(d) for d in jax.devices()],
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "load_average": os.getloadavg()}
  for mode, explain in (("no_explain", False), ("explain", True)):
    predictions, cold_s = _timed(lambda explain=explain: predictor.predict(products, explain=explain))
    warm = []
    for _ in range(_REPEATS.value):
      predictions, seconds = _timed(lambda explain=explain: predictor.predict(products,
                                                                              explain=explain))
      warm.append(seconds)
    with tempfile.TemporaryDirectory() as output:
      _, write_s = _timed(lambda predictions=predictions, output=output: predictor.write(
          predictions, output, max_cards=_MAX_CARDS.value))
    median = statistics.median(warm)
    record["modes"][mode] = {
        "cold_s": cold_s, "warm_s": warm, "products_per_s": len(products) / median,
        "phases_s_last_call": predictions.timings, "write_s": write_s,
        "cards_written": min(_MAX_CARDS.value or len(products), len(products)) if explain else 0,
        "method": predictions.method}
    print(f"{mode}: {len(products) / median:.1f} products/s (warm median {median:.2f} s for "
          f"{len(products)}; cold {cold_s:.2f} s; writing {write_s:.2f} s)")
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
