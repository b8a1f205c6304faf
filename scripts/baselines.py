"""The simple scikit-learn baselines of issue #6, on the fashion catalogue's fixed split.

  PYTHONPATH=. python scripts/baselines.py --manual_dir=../shared/data/fashion-products \
      --task=all --out=docs/results/baselines.json

(from the repository root; PYTHONPATH is not needed once the package is pip-installed). Needs
scikit-learn (`pip install scikit-learn`, or the package's `test` extra).

These are what a user would try before any network, so the JAX models have a floor to beat:
  - `tfidf_logreg`: TF-IDF of the titles (word 1-2 grams, sublinear tf) + logistic regression.
  - `pixel_logreg`: logistic regression on the photo resized to 24x32 (W x H, the catalogue's 3:4
    portrait aspect), RGB scaled to [0, 1] and standardised with the training mean and deviation.
  - `average`: the mean of the two models' predicted class probabilities.
Each logistic regression (scikit-learn's default lbfgs, multinomial) is fitted on train once per C
of its grid; the C with the best validation macro F1 is kept (ties go to the smaller C) and that same
fitted model is scored on validation and test. The pixel fits are float32 and stop at
--pixel_max_iter=100 lbfgs steps, unconverged: each step is two dense (n x 2304) products, and the
bound keeps both tasks near 11 minutes on two shared CPU cores (--num_threads=1). Averaging is
sensitive to that choice: a less regularised or longer-trained pixel model is more confident and
pulls the average further below the text model (see docs/results/baselines.json for the C chosen).

The class set and the rows are the ones the TFDS builder prepares (`jmmshap.builders`): classes are
selected by `fashion_products_config` from label counts over the whole CSV, rows of other classes
are excluded by design, and bad rows (empty title, missing or corrupt image, ...) stop the run with
the CSV line, or with --on_bad_row=skip are skipped and counted in the JSON, as the builder does.
Metrics are `jmmshap.metrics.classification_metrics` (accuracy, macro and weighted P/R/F1).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from jmmshap import builders, catalog, errors
from jmmshap import metrics

try:
  from sklearn import feature_extraction
  from sklearn import linear_model
  from sklearn import preprocessing
  from sklearn.exceptions import ConvergenceWarning
  import threadpoolctl  # A scikit-learn dependency.
except ImportError as error:
  raise ImportError("scripts/baselines.py needs scikit-learn: `pip install scikit-learn` "
                    "(or `pip install -e .[test]`).") from error

# Each task's class selection, as passed to builders.fashion_products_config.
TASKS = {
    "article_type": {"top_k": 31, "min_count": None},
    "sub_category": {"top_k": None, "min_count": 100},
}
IMAGE_WIDTH, IMAGE_HEIGHT = 24, 32  # The catalogue's photos are 60x80: keep their 3:4 portrait aspect.
METHODS = ("tfidf_logreg", "pixel_logreg", "average")

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with products.csv and images/.")
_TASK = flags.DEFINE_enum("task", "all", [*TASKS, "all"], "Label field to classify, or all of them.")
_OUT = flags.DEFINE_string("out", "baselines.json", "Where to write the JSON results.")
_ON_BAD_ROW = flags.DEFINE_enum("on_bad_row", "error", list(builders.ON_BAD_ROW),
                                "As the builder's on_bad_row: stop at a bad row, or skip and count it.")
_TEXT_CS = flags.DEFINE_list("text_cs", ["1", "10", "100"], "C grid of the TF-IDF regression.")
_PIXEL_CS = flags.DEFINE_list("pixel_cs", ["0.01", "0.1", "1"], "C grid of the pixel regression.")
_TEXT_MAX_ITER = flags.DEFINE_integer("text_max_iter", 1000, "lbfgs iterations per TF-IDF fit.")
_PIXEL_MAX_ITER = flags.DEFINE_integer("pixel_max_iter", 100,
                                       "lbfgs iterations per pixel fit (bounded to keep the run cheap).")
_NUM_THREADS = flags.DEFINE_integer(
    "num_threads", 0, "BLAS/OpenMP threads for scikit-learn; 0 keeps the libraries' default. On a "
    "CPU shared with other jobs, 1 avoids OpenMP threads waiting on each other.")


@dataclasses.dataclass
class Split:
  """One split of a task: titles, flattened 32x24x3 uint8 photos and class indices, row-aligned."""
  ids: list[str]
  titles: list[str]
  pixels: np.ndarray  # (n, IMAGE_HEIGHT * IMAGE_WIDTH * 3) uint8
  labels: np.ndarray  # (n,) int64 indices into the task's class list

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass
class MethodResult:
  """Class probabilities (columns in the task's class order) of the model kept after tuning C."""
  validation_probs: np.ndarray
  test_probs: np.ndarray
  C: float | None = None
  validation_f1_by_C: dict[str, float] = dataclasses.field(default_factory=dict)
  iterations_by_C: dict[str, int] = dataclasses.field(default_factory=dict)
  fit_seconds: float = 0.0


def task_classes(manual_dir: str, task: str) -> list[str]:
  """The builder's own class selection for `task` (counts over every split of the CSV)."""
  config = builders.fashion_products_config(manual_dir, label_field=task, **TASKS[task])
  return list(config.class_names)


def image_pixels(path: str) -> np.ndarray:
  """The photo in RGB, resized to 24x32, flattened uint8.

  A photo that does not decode is handed to the builder's own check, so a rejected row gets the
  builder's verdict and reason (missing / unreadable / corrupt image) as `catalog.ImageProblem`.
  """
  try:
    with Image.open(path) as image:
      # Bilinear, as the input pipeline resizes; PIL widens the filter when shrinking, so it averages.
      small = image.convert("RGB").resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.BILINEAR)
      return np.asarray(small, np.uint8).reshape(-1)
  except Exception as error:  # pylint: disable=broad-except  # PIL raises many types for bad files.
    catalog.encoded_rgb_image(path)  # Raises catalog.ImageProblem.
    raise RuntimeError(f"{path}: the builder accepts this image but it failed to resize") from error


def load_splits(manual_dir: str, task: str, class_names: Sequence[str], *, on_bad_row: str = "error",
                pixel_cache: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Split], dict]:
  """The rows the builder would prepare for this class set, per split, and what was left out.

  Returns (splits, report) with report = {'excluded_by_selection': {split: n}, 'skipped': {split: n},
  'bad_rows': [{'split', 'line', 'id', 'file', 'reason'}]}. `pixel_cache` (path -> pixels) lets
  several tasks on one catalogue decode each photo once.
  """
  on_bad_row = catalog.check_on_bad_row(on_bad_row)
  products = catalog.fashion_catalog(manual_dir, task)
  pixel_cache = {} if pixel_cache is None else pixel_cache
  label_index = {name: i for i, name in enumerate(class_names)}
  bad_rows: list[catalog.BadRow] = []

  def reject(bad: catalog.BadRow) -> None:
    if on_bad_row == "error":
      raise catalog.BadRowError(
          f"Bad row in {products.csv_path}, line {bad.line} (id {bad.id!r}): {bad.reason}"
          f"{'' if bad.file == products.csv_path else ': ' + bad.file}. Fix or remove the row, or "
          "pass --on_bad_row=skip to skip bad rows (they are then counted in the output JSON).")
    bad_rows.append(bad)

  for bad in products.bad_rows:
    reject(bad)
  excluded = collections.Counter()
  columns = {split: {"ids": [], "titles": [], "pixels": [], "labels": []} for split in catalog.SPLITS}
  for row in products.rows:
    if row.label not in label_index:
      excluded[row.split] += 1
      continue
    if row.image_path not in pixel_cache:
      try:
        pixel_cache[row.image_path] = image_pixels(row.image_path)
      except catalog.ImageProblem as problem:
        reject(catalog.BadRow(row.split, row.line, row.id, row.image_path, problem.reason))
        continue
    split = columns[row.split]
    split["ids"].append(row.id)
    split["titles"].append(row.title)
    split["pixels"].append(pixel_cache[row.image_path])
    split["labels"].append(label_index[row.label])

  splits = {}
  for name, split in columns.items():
    if not split["ids"]:
      raise ValueError(f"{products.csv_path}: split {name!r} has no usable {task} rows of the "
                       f"{len(class_names)} selected classes; every split needs at least one.")
    splits[name] = Split(split["ids"], split["titles"], np.stack(split["pixels"]),
                         np.asarray(split["labels"], np.int64))
  skipped = collections.Counter(bad.split for bad in bad_rows)
  report = {
      "excluded_by_selection": {name: excluded.get(name, 0) for name in catalog.SPLITS},
      "skipped": {name: skipped.get(name, 0) for name in (*catalog.SPLITS, catalog.UNASSIGNED)},
      "bad_rows": [dataclasses.asdict(bad) for bad in sorted(bad_rows, key=lambda bad: bad.line)],
  }
  return splits, report


def _full_probs(model, features, num_classes: int) -> np.ndarray:
  """predict_proba with one column per task class, zero for a class train never showed."""
  probs = np.zeros((features.shape[0], num_classes))
  probs[:, model.classes_] = model.predict_proba(features)
  return probs


def _tuned_logreg(train_features, train_labels: np.ndarray, validation_features, validation_labels,
                  test_features, num_classes: int, cs: Sequence[float], max_iter: int) -> MethodResult:
  """One fit per C on train; keeps the best validation macro F1 (first, so smallest C, on ties).

  A fit that stops at max_iter is kept as it is (the bound is deliberate, to keep the run cheap):
  its iteration count is recorded instead of a ConvergenceWarning.
  """
  best, f1_by_c, iterations_by_c = None, {}, {}
  start = time.perf_counter()
  for c in sorted(cs):
    model = linear_model.LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      model.fit(train_features, train_labels)
    iterations_by_c[repr(c)] = int(np.max(model.n_iter_))
    validation_probs = _full_probs(model, validation_features, num_classes)
    f1 = metrics.classification_metrics(validation_labels, validation_probs.argmax(1),
                                        num_classes)["f1_macro"]
    f1_by_c[repr(c)] = f1
    if best is None or f1 > best[0]:
      best = (f1, c, model, validation_probs)
  _, c, model, validation_probs = best
  return MethodResult(validation_probs, _full_probs(model, test_features, num_classes), C=c,
                      validation_f1_by_C=f1_by_c, iterations_by_C=iterations_by_c,
                      fit_seconds=time.perf_counter() - start)


def tfidf_logreg(splits: Mapping[str, Split], num_classes: int, cs: Sequence[float] = (1, 10, 100),
                 max_iter: int = 1000) -> MethodResult:
  """TF-IDF (word 1-2 grams, sublinear tf, fitted on train titles) + logistic regression."""
  vectorizer = feature_extraction.text.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
  train = vectorizer.fit_transform(splits["train"].titles)
  return _tuned_logreg(train, splits["train"].labels,
                       vectorizer.transform(splits["validation"].titles), splits["validation"].labels,
                       vectorizer.transform(splits["test"].titles), num_classes, cs, max_iter)


def pixel_logreg(splits: Mapping[str, Split], num_classes: int, cs: Sequence[float] = (0.01, 0.1, 1),
                 max_iter: int = 100) -> MethodResult:
  """Logistic regression on [0, 1] RGB pixels standardised with train statistics.

  float32 features: the two dense (n x 2304) x (2304 x classes) products of each lbfgs step are the
  whole cost, and float32 halves it.
  """
  scaler = preprocessing.StandardScaler()
  train = scaler.fit_transform(splits["train"].pixels.astype(np.float32) / 255.0)

  def features(name: str) -> np.ndarray:
    return scaler.transform(splits[name].pixels.astype(np.float32) / 255.0)

  return _tuned_logreg(train, splits["train"].labels, features("validation"),
                       splits["validation"].labels, features("test"), num_classes, cs, max_iter)


def average(results: Sequence[MethodResult]) -> MethodResult:
  """Mean of the members' class probabilities (each member already tuned on its own)."""
  return MethodResult(np.mean([r.validation_probs for r in results], axis=0),
                      np.mean([r.test_probs for r in results], axis=0))


def evaluate(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  return metrics.classification_metrics(labels, probs.argmax(axis=1), probs.shape[1])


def run_task(manual_dir: str, task: str, *, on_bad_row: str = "error",
             text_cs: Sequence[float] = (1, 10, 100), pixel_cs: Sequence[float] = (0.01, 0.1, 1),
             text_max_iter: int = 1000, pixel_max_iter: int = 100,
             pixel_cache: dict[str, np.ndarray] | None = None) -> dict:
  """Every baseline on one task; the JSON entry for that task."""
  start = time.perf_counter()
  class_names = task_classes(manual_dir, task)
  splits, report = load_splits(manual_dir, task, class_names, on_bad_row=on_bad_row,
                               pixel_cache=pixel_cache)
  load_seconds = time.perf_counter() - start
  num_classes = len(class_names)
  text = tfidf_logreg(splits, num_classes, text_cs, text_max_iter)
  pixels = pixel_logreg(splits, num_classes, pixel_cs, pixel_max_iter)
  results = {"tfidf_logreg": text, "pixel_logreg": pixels, "average": average([text, pixels])}
  methods = {}
  for name, result in results.items():
    methods[name] = {
        "test": evaluate(splits["test"].labels, result.test_probs),
        "validation": evaluate(splits["validation"].labels, result.validation_probs),
    }
    if result.C is not None:
      methods[name].update(C=result.C, validation_f1_macro_by_C=result.validation_f1_by_C,
                           lbfgs_iterations_by_C=result.iterations_by_C,
                           fit_seconds=round(result.fit_seconds, 1))
  return {
      "classes": class_names,
      "class_selection": TASKS[task],
      **{f"num_{name}": len(splits[name]) for name in catalog.SPLITS},
      "train_count_by_class": dict(zip(class_names, np.bincount(splits["train"].labels,
                                                               minlength=num_classes).tolist())),
      **report,
      "load_seconds": round(load_seconds, 1),
      "seconds": round(time.perf_counter() - start, 1),
      "methods": methods,
  }


def markdown_table(results: Mapping[str, dict]) -> str:
  """Test accuracy and macro/weighted F1 of every method of every task, one row each."""
  lines = ["| task | classes | method | C | test accuracy | test F1 macro | test F1 weighted "
           "| validation F1 macro |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
  for task, result in results.items():
    for method, scores in result["methods"].items():
      c = scores.get("C")
      lines.append(f"| {task} | {len(result['classes'])} | {method} | {'' if c is None else f'{c:g}'} "
                   f"| {scores['test']['accuracy']:.3f} | {scores['test']['f1_macro']:.3f} "
                   f"| {scores['test']['f1_weighted']:.3f} | {scores['validation']['f1_macro']:.3f} |")
  return "\n".join(lines)


def _floats(values: Sequence[str], flag: str) -> list[float]:
  try:
    parsed = [float(value) for value in values]
  except ValueError:
    raise app.UsageError(f"--{flag}={','.join(values)}: expected comma-separated numbers.") from None
  if not parsed or any(c <= 0 for c in parsed):
    raise app.UsageError(f"--{flag}={','.join(values)}: expected one or more positive C values.")
  return parsed


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _MANUAL_DIR.value:
    raise app.UsageError("--manual_dir is required: the folder with products.csv and images/.")
  text_cs, pixel_cs = _floats(_TEXT_CS.value, "text_cs"), _floats(_PIXEL_CS.value, "pixel_cs")
  tasks = list(TASKS) if _TASK.value == "all" else [_TASK.value]
  start = time.perf_counter()
  pixel_cache: dict[str, np.ndarray] = {}
  results = {}
  with threadpoolctl.threadpool_limits(_NUM_THREADS.value or None):
    for task in tasks:
      results[task] = run_task(
          _MANUAL_DIR.value, task, on_bad_row=_ON_BAD_ROW.value, text_cs=text_cs, pixel_cs=pixel_cs,
          text_max_iter=_TEXT_MAX_ITER.value, pixel_max_iter=_PIXEL_MAX_ITER.value,
          pixel_cache=pixel_cache)
      print(f"{task}: {len(results[task]['classes'])} classes, train/validation/test "
            f"{results[task]['num_train']}/{results[task]['num_validation']}/"
            f"{results[task]['num_test']}, {time.perf_counter() - start:.0f} s so far", flush=True)
  seconds = time.perf_counter() - start
  if os.path.dirname(_OUT.value):
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=1)
  print(markdown_table(results))
  print(f"total {seconds:.0f} s; wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
