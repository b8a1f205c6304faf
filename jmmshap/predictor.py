"""Classify and explain new products with a finished workdir: the trained ensemble, used.

    predictor = Predictor.load(W)                 # checks W is finished and consistent
    predictions = predictor.predict(rows)         # a DataFrame, list of dicts, Products or a CSV's
    predictions.frame()                           # one row per product (pandas), as predictions.csv
    predictor.predict_proba(rows)                 # (N, C), columns predictor.class_names
    predictor.explain(rows)                       # explanation cards (HTML in Jupyter, .png())

Everything comes from the workdir: each learner's saved config, tokenizer, class names and best
checkpoint (`classifier.load_trained`), the MM-SHAP settings the mmshap stage ran with (the main
job's `stages.mmshap`, checked against the stage's fingerprint), and the meta-models
(`meta.restore`, which refuses a meta-model trained on other meta-features than the workdir's
outputs give now). A product goes through the same code as a test example: the learners' logits
by `classifier.evaluate` with the stage's batch size (each process reads its rows of every global
batch, the logits are gathered in input order), its own MM-SHAP shares by
`mmshap_stage.explain_split` (exact up to the configured player count, the configured estimator
above it), the meta-features by `weighting.split_features`. So the test split, given as new
products, gets the probabilities the meta stage reported for it (tests/test_predict.py).

The ensemble's class (`Predictions.method`, 'auto'): the method the meta stage chose by its
validation macro F1, out of fold for the meta-models (W/meta/selection.json, `ensemble.py`); where
the predictions lack it (mmshap_sample or mmshap_complement, products not explained), the next of
its ranking. Without out-of-fold scores (`meta.cross_fit=0`), or in a workdir older than the
selection, the fixed `ensemble.PREFERENCE`. summary.json names the method and why.

`predict_to_folder` (predict.py) goes through a catalogue a chunk of products at a time (photos
read for the chunk, every model run on it, its rows appended to the output files: `OutputFolder`),
so memory holds one chunk whatever the product count; a chunk is a multiple of every batch, so the
numbers are those of one pass over all products.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from jmmshap import (classifier, ensemble, errors, explanations, games, input_pipeline,
                     learner_outputs, meta, metrics, mmshap, mmshap_stage, pipeline, players,
                     products as products_lib, stream_files, weighting, workdir)
from jmmshap.models import clip_vision, mmbt as mmbt_lib
from jmmshap.products import Columns, Products

LEARNERS = learner_outputs.LEARNERS
AUTO = "auto"
PRODUCTS_SPLIT = "products"  # How new products are named in progress bars and messages.
DEFAULT_CHUNK_SIZE = 4096  # Products per chunk of `predict_to_folder` (predict.py --chunk_size).
CONSTANT_ARRAYS = ("class_names",)  # mmshap.npz arrays that are not one row per product.


class WorkdirNotReady(RuntimeError, errors.UserError):
  """A workdir the predictor cannot use as it is: unfinished, or parts built from other inputs."""


class CannotPredict(ValueError, errors.UserError):
  """Products or options the predictor cannot do as asked with: no usable row, no labels where
  the workdir explains labels, a method it has not."""


def main_job_command(root: str, variant: str) -> str:
  return f"python train.py --config=configs/meta.py:{variant} --workdir={root}"


def check_finished(root: str, output_dir: str = ensemble.STAGE) -> ml_collections.ConfigDict:
  """The main job's saved config, once every stage's outputs are there and none is out of date;
  else an error naming what is missing or stale and the command that makes it whole."""
  config_path = workdir.path(root, output_dir, workdir.CONFIG)
  if not os.path.isfile(config_path):
    raise WorkdirNotReady(
        f"{root} holds no finished main job ({config_path} not found): train it first, e.g. "
        f"{main_job_command(root, 'toyshop')} (with the variant and flags of your data).")
  config = ml_collections.ConfigDict(workdir.read_json(config_path))
  hint = (f"run the main job again, which runs only what is missing or out of date: "
          f"{main_job_command(root, config.variant)} (with the flags it was trained with)")
  missing = []
  for name in config.stages:
    missing += workdir.missing(root, name, pipeline.REGISTRY[name].writes)
  missing += workdir.missing(root, output_dir, pipeline.REGISTRY[pipeline.MAIN_JOB].writes)
  for name in weighting.parse_weightings(config.meta.weighting):
    checkpoints = os.path.join(root, output_dir, weighting.METHOD_OF_WEIGHTING[name],
                               workdir.CHECKPOINTS)
    if not os.path.isdir(checkpoints):
      missing.append(checkpoints)
  if missing:
    raise WorkdirNotReady(f"{root} is not finished: {', '.join(missing[:4])}"
                          f"{' and more' if len(missing) > 4 else ''} missing; {hint}.")
  stale = []
  for name in config.stages:
    saved = workdir.read_fingerprint(root, name)
    for read, run in (saved or {}).get("reads", {}).items():
      if workdir.run_of(root, read) != run:
        stale.append(f"{name} was built from a {read} run that was replaced since")
  differences = workdir.settings_differences(root, mmshap_stage.STAGE, config.stages.mmshap)
  if differences:
    stale.append(f"the mmshap stage ran with other settings than the main job's config "
                 f"({'; '.join(differences[:3])})")
  if stale:
    raise WorkdirNotReady(f"{root} is out of date: {'; '.join(stale)}; {hint}.")
  return config


def _device_multiple(value: int) -> int:
  devices = jax.device_count()
  return -(-value // devices) * devices


def feature_grid(model: mmbt_lib.MMBT, image_size: int) -> tuple[int, int]:
  """(height, width) of the vision tower's feature map that the image embeddings pool."""
  if isinstance(model.vision, clip_vision.CLIPVisionModel):
    side = image_size // model.vision.config.patch_size
    return side, side
  graphdef, state = nnx.split(model.vision)
  shape = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x)["last_hidden_state"], state,
                         jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)).shape
  return shape[1], shape[2]


def title_segments(tokenizer: Any, title: str, options: mmshap.Options,
                   values: np.ndarray | None) -> list[explanations.Segment]:
  """The title cut into the characters of each text player (as `mmshap.text_players` groups the
  tokenizer's words) and the characters of none, each player's with its Shapley value."""
  if values is None:
    return [explanations.Segment(title)]
  encoding = tokenizer.tokenizer.encode(title)
  word_ids = np.asarray([[-1 if word is None or special else word for word, special in
                          zip(encoding.word_ids, encoding.special_tokens_mask)]])
  player_of_token, _ = mmshap.text_players(word_ids, grouping=options.text_players,
                                           tokens_per_player=options.tokens_per_player,
                                           max_text_players=options.max_text_players)
  owner = np.full(len(title), -1)
  for player, (start, end) in zip(player_of_token[0], encoding.offsets):
    if player >= 0:
      owner[start:end] = player
  for player in np.unique(owner[owner >= 0]):  # The spaces inside a merged player are its own.
    inside = np.flatnonzero(owner == player)
    span = slice(inside.min(), inside.max() + 1)
    owner[span] = np.where(owner[span] < 0, player, owner[span])
  segments, start = [], 0
  for end in range(1, len(title) + 1):
    if end == len(title) or owner[end] != owner[start]:
      player = int(owner[start])
      segments.append(explanations.Segment(title[start:end], None if player < 0 else player,
                                           None if player < 0 else float(values[player])))
      start = end
  return segments


@dataclasses.dataclass
class Predictions:
  """What the predictor says about products, in their input order."""
  products: Products
  class_names: tuple[str, ...]
  probabilities: dict[str, np.ndarray]  # method -> (N, C): learners, average, meta-models.
  method: str  # The ensemble method of `classes()`, `top()` and the cards.
  shapley: dict[str, np.ndarray] | None  # MM-SHAP arrays (as W/mmshap/mmshap_{split}.npz); None.
  timings: dict[str, float]

  @property
  def ids(self) -> np.ndarray:
    return np.asarray(self.products.ids, dtype=str)

  @property
  def labels(self) -> np.ndarray | None:
    if self.products.labels is None:
      return None
    index = {name: i for i, name in enumerate(self.class_names)}
    return np.asarray([index[label] for label in self.products.labels], np.int32)

  def classes(self, method: str | None = None) -> np.ndarray:
    """The predicted class name of every product."""
    return np.asarray(self.class_names)[self.probabilities[method or self.method].argmax(-1)]

  def top(self, k: int, method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, probabilities), each (N, k), most probable first."""
    probabilities = self.probabilities[method or self.method]
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=-1)

  def table(self, top_k: int = 3) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of predictions.csv: id, [label], the ensemble's class, probability and top
    classes, every method's class and probability, then T-SHAP / V-SHAP of the MMBT."""
    names = np.asarray(self.class_names)
    k = min(top_k, len(names))
    header = ["id"] + (["label"] if self.products.labels is not None else [])
    header += ["prediction", "probability", "method"]
    header += [f"top{i + 1}_{what}" for i in range(k) for what in ("class", "probability")]
    header += [f"{method}_{what}" for method in self.probabilities for what in ("class",
                                                                                "probability")]
    header += ["t_shap", "v_shap", "mmshap_exact", "mmshap_explained_class"]
    top_index, top_probability = self.top(k)
    rows = []
    for row, product_id in enumerate(self.products.ids):
      cells = [product_id] + ([self.products.labels[row]] if self.products.labels is not None else [])
      best = self.probabilities[self.method][row]
      cells += [names[best.argmax()], float(best.max()), self.method]
      for i in range(k):
        cells += [names[top_index[row, i]], float(top_probability[row, i])]
      for probabilities in self.probabilities.values():
        cells += [names[probabilities[row].argmax()], float(probabilities[row].max())]
      if self.shapley is None:
        cells += [None, None, None, None]
      else:
        cells += [float(self.shapley["t_shap"][row]), float(self.shapley["v_shap"][row]),
                  bool(self.shapley["exact"][row]), names[self.shapley["targets"][row]]]
      rows.append(cells)
    return header, rows

  def frame(self, top_k: int = 3) -> Any:
    """`table()` as a pandas DataFrame (pandas is needed only for this)."""
    import pandas  # pylint: disable=import-outside-toplevel  # Optional: only for data frames.
    header, rows = self.table(top_k)
    return pandas.DataFrame(rows, columns=header)

  def metrics(self) -> dict[str, Any] | None:
    """With labels: {"methods": {method: metrics}}, the meta stage's metrics.json format."""
    labels = self.labels
    if labels is None:
      return None
    return {"methods": {method: metrics.classification_metrics(
        labels, probabilities.argmax(-1), len(self.class_names))
                        for method, probabilities in self.probabilities.items()}}

  def csv_text(self, top_k: int = 3) -> str:
    header, rows = self.table(top_k)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(csv_cells(row) for row in rows)
    return buffer.getvalue()


def csv_cells(row: list[Any]) -> list[Any]:
  """A `Predictions.table` row as predictions.csv spells it (floats to 9 digits, None empty)."""
  return ["" if cell is None else f"{cell:.9g}" if isinstance(cell, float) else cell
          for cell in row]


class Predictor:
  """The trained ensemble of a finished workdir; see the module docstring. Build with `load`."""

  def __init__(self, root: str, config: ml_collections.ConfigDict,
               learners: dict[str, classifier.TrainedStage], batch_sizes: dict[str, int],
               meta_models: dict[str, Any], mean_shares: tuple[float, float] | None,
               mmshap_config: ml_collections.ConfigDict, explainer: mmshap.Explainer,
               class_names: tuple[str, ...],
               region_boxes: Callable[[int], list[tuple[float, float, float, float]]],
               selection: dict[str, Any]):
    """region_boxes(n): the photo fractions of a product's n image players; selection: the meta
    stage's choice of 'auto' (`ensemble.read_selection`)."""
    self.root, self.config, self.selection = root, config, selection
    self.learners, self.batch_sizes = learners, batch_sizes
    self.meta_models, self.mean_shares = meta_models, mean_shares
    self.mmshap_config, self.explainer = mmshap_config, explainer
    self.class_names, self.region_boxes = class_names, region_boxes
    self.columns = products_lib.default_columns(learners["mmbt"].config.data)
    mesh = explainer.mesh
    self._logits = {name: classifier.logits_fn(learners[name], classifier.CLASSIFIERS[name], mesh)
                    for name in LEARNERS}

  @classmethod
  def load(cls, root: str, *, output_dir: str = ensemble.STAGE, batch_size: int = 0) -> Predictor:
    """Restores a finished workdir's learners, MM-SHAP settings and meta-models.

    batch_size: products per forward call of each learner (0: each stage's eval_batch_size),
    rounded up to a multiple of the device count.
    """
    config = check_finished(root, output_dir)
    hint = (f"the predictor uses a workdir only when it is consistent: run the main job again "
            f"({main_job_command(root, config.variant)}, with the flags it was trained with)")
    learners = {name: classifier.load_trained(root, classifier.CLASSIFIERS[name]) for name in LEARNERS}
    outputs = {split: learner_outputs.load_base_outputs(root, split)
               for split in ("validation", "test")}
    class_names = outputs["test"].class_names
    for name, trained in learners.items():
      learner_outputs.check_class_names(class_names, outputs["test"].paths["text"],
                                        trained.class_names, workdir.path(root, name,
                                                                          workdir.CLASS_NAMES))
    weightings = weighting.parse_weightings(config.meta.weighting)
    shares = mean_shares = None
    if any(name != "none" for name in weightings):
      shares = {split: learner_outputs.load_shares(root, outputs[split]) for split in outputs}
      mean_shares = weighting.dataset_shares(shares["validation"])
    meta_models = {}
    for name in weightings:
      data = weighting.method_data(outputs, shares, name, config.meta)
      directory = os.path.join(root, output_dir, data.method)
      try:
        meta_models[name], _ = meta.restore(data, config.meta, directory, config.seed, class_names)
      except (ValueError, FileNotFoundError) as error:
        raise WorkdirNotReady(f"{error} ({hint})") from error
    devices = jax.device_count()
    mmshap_config = ml_collections.ConfigDict(config.stages.mmshap.to_dict())
    mmshap_config.max_examples = 0  # Every product.
    options = mmshap_stage.options_from_config(mmshap_config)
    options = dataclasses.replace(
        options, examples_per_group=_device_multiple(options.examples_per_group),
        chunk_size=_device_multiple(options.chunk_size) if options.chunk_size else 0)
    mmbt = learners["mmbt"]
    mmshap_config.examples_per_group = options.examples_per_group
    # A copy of the MMBT, so that its masking follows the mmshap stage's without touching the
    # learner's.
    model = games.with_masking(nnx.merge(*nnx.split(mmbt.model)), mmshap_config.get("text_masking"),
                               mmshap_config.get("image_masking"))
    explainer = mmshap_stage.process_explainer(model, options, tokenizer=mmbt.tokenizer)
    batch_sizes = {name: _device_multiple(batch_size or trained.config.get("eval_batch_size")
                                          or trained.config.batch_size)
                   for name, trained in learners.items()}
    size = mmbt.config.data.image_size
    if options.image_players == "patches":  # Each product's own grid (its image player count).
      boxes = lambda count: players.patch_boxes(size, size, math.isqrt(count))
    else:
      pooled = explanations.pooling_boxes(mmbt_lib.POOLING_GRIDS[model.config.num_image_embeddings],
                                          feature_grid(model, size))
      boxes = lambda count: pooled
    logging.info("predictor: %s loaded (%d classes, %d devices; meta-models %s)", root,
                 len(class_names), devices, ", ".join(weighting.METHOD_OF_WEIGHTING[w]
                                                       for w in weightings))
    return cls(root, config, learners, batch_sizes, meta_models, mean_shares, mmshap_config,
               explainer, tuple(class_names), boxes,
               ensemble.read_selection(os.path.join(root, output_dir), weightings))

  # ------------------------------------------------------------------------------------------------
  # Reading products.

  def read(self, source: Any, *, columns: Columns | None = None, image_dir: str | None = None,
           on_bad_row: str = "error", keep_photos: bool = True) -> Products:
    """Products from a CSV path, an input folder (its CSV and image folder), or rows in memory;
    columns default to those of the data the workdir was trained on. keep_photos=False (a CSV):
    each photo is checked and dropped, and read again when its products are predicted."""
    columns = columns or self.columns
    if isinstance(source, Products):
      return source
    if isinstance(source, (str, os.PathLike)):
      path = os.fspath(source)
      if os.path.isdir(path):
        image_dir = image_dir or os.path.join(path, columns.image_dir)
        path = os.path.join(path, columns.csv)
      return products_lib.read_csv(path, self.class_names, columns=columns, image_dir=image_dir,
                                   on_bad_row=on_bad_row, keep_photos=keep_photos)
    return products_lib.from_rows(source, self.class_names, columns=columns, image_dir=image_dir,
                                  on_bad_row=on_bad_row)

  # ------------------------------------------------------------------------------------------------
  # Predicting.

  def _check_ids(self, ids: np.ndarray, products: Products, who: str) -> None:
    """A product is never dropped or moved: every output row carries the id it was given."""
    expected = np.asarray(products.ids, dtype=str)
    ids = np.asarray(ids, dtype=str)
    if ids.shape != expected.shape or (ids != expected).any():
      row = int(np.argmax(ids != expected)) if ids.shape == expected.shape else min(len(ids),
                                                                                    len(expected))
      raise RuntimeError(f"{who}: output row {row} is not the product given there ({len(ids)} "
                         f"rows out, {len(expected)} in): the products would be misaligned.")

  def predict(self, source: Any, *, explain: bool = True, method: str = AUTO,
              columns: Columns | None = None, image_dir: str | None = None,
              on_bad_row: str = "error") -> Predictions:
    """Every learner's and every meta-model's probabilities for the products, in input order; with
    `explain` each product's own MM-SHAP (needed by mmshap_sample and mmshap_complement), without
    it neither.

    source: as `read` takes it. method: the ensemble method of the headline class ('auto': see
    the module docstring).
    """
    products = self.read(source, columns=columns, image_dir=image_dir, on_bad_row=on_bad_row)
    return self.predict_products(products, explain=explain, method=method)

  def check_products(self, products: Products, explain: bool) -> None:
    """Products the predictor can classify (and explain), before any model runs."""
    if not len(products):
      raise CannotPredict(f"no products to classify: all {len(products.bad_rows)} rows of "
                          f"{products.source} are bad (listed in bad_rows.json).")
    if explain and self.mmshap_config.target == "label" and products.labels is None:
      raise CannotPredict("the mmshap stage explained each example's label (target='label'), and "
                          "these products have none: give labels, or classify without MM-SHAP "
                          "(explain=False, --no_explain), which uses dataset weighting only.")

  def chunk_rows(self, chunk_size: int) -> int:
    """`chunk_size` rounded up to a multiple of every learner's batch and of MM-SHAP's group of
    examples: a chunk's batches and groups are those of one pass over all products, so the
    chunking changes no number."""
    multiple = math.lcm(*self.batch_sizes.values(), self.explainer.options.examples_per_group)
    return -(-max(chunk_size, 1) // multiple) * multiple

  def predict_products(self, products: Products, *, explain: bool, method: str,
                       first_index: int = 0) -> Predictions:
    """`predict` of products read; `first_index`: the position of products[0] in the whole input
    (a chunk's), which seeds the MM-SHAP estimates of its products as in one pass."""
    self.check_products(products, explain)
    records = products_lib.records(products, self.class_names)
    timings: dict[str, float] = {}
    logits = {}
    for name in LEARNERS:
      started = time.perf_counter()
      result = self._logits[name](records, self.batch_sizes[name])
      self._check_ids(result["ids"], products, f"the {name} learner")
      logits[name] = result["logits"]
      timings[f"{name}_s"] = time.perf_counter() - started
    shapley = None
    if explain:
      started = time.perf_counter()
      shapley, _ = mmshap_stage.explain_split(
          self.explainer, records, self.learners["mmbt"].preprocess, config=self.mmshap_config,
          class_names=self.class_names, split=PRODUCTS_SPLIT, first_index=first_index)
      self._check_ids(shapley["ids"], products, "MM-SHAP")
      timings["mmshap_s"] = time.perf_counter() - started
    started = time.perf_counter()
    probabilities = ensemble.learner_probabilities(logits)
    for name, predict in self.meta_models.items():
      if name in weighting.PER_EXAMPLE and shapley is None:
        continue
      shares = None if name not in weighting.PER_EXAMPLE else learner_outputs.Shares(
          shapley["t_shap"], shapley["v_shap"], np.ones(len(products), bool), PRODUCTS_SPLIT)
      features, _ = weighting.split_features(name, logits, self.config.meta, self.mean_shares,
                                             shares, PRODUCTS_SPLIT)
      probabilities[weighting.METHOD_OF_WEIGHTING[name]] = predict(features).mean(axis=0)
    timings["meta_s"] = time.perf_counter() - started
    if method == AUTO:
      method, _ = ensemble.auto_method(self.selection, probabilities)
    elif method not in probabilities:
      raise CannotPredict(f"method={method!r}: these predictions have {', '.join(probabilities)}.")
    return Predictions(products, self.class_names, probabilities, method, shapley, timings)

  def predict_proba(self, source: Any, *, method: str = AUTO, explain: bool = True,
                    **read_options: Any) -> np.ndarray:
    """(N, C) probabilities of one method (the ensemble's by default); columns `class_names`."""
    predictions = self.predict(source, explain=explain, method=method, **read_options)
    return predictions.probabilities[predictions.method]

  def explain(self, source: Any, *, top_k: int = 3, **read_options: Any) -> list[explanations.Card]:
    """Each product's explanation card (`Card.html()`, `Card.png()`; a notebook shows it)."""
    return self.cards(self.predict(source, explain=True, **read_options), top_k=top_k)

  # ------------------------------------------------------------------------------------------------
  # Explanations and outputs.

  def image_players_text(self) -> str:
    options = self.explainer.options
    if options.image_players == "patches":
      grid = f"{options.patch_grid}x{options.patch_grid}" if options.patch_grid else "the authors'"
      return f"{grid} grid of pixel patches"
    return f"the MMBT's {len(self.region_boxes(0))} image regions"

  def cards(self, predictions: Predictions, *, top_k: int = 3,
            limit: int = 0) -> list[explanations.Card]:
    """Explanation cards of the first `limit` products (0: all)."""
    products, names, shapley = predictions.products, predictions.class_names, predictions.shapley
    count = len(products) if not limit else min(limit, len(products))
    top_index, top_probability = predictions.top(min(top_k, len(names)))
    value = self.explainer.options.value
    cards = []
    for row in range(count):
      text_values, regions, t_shap, v_shap, described = None, [], None, None, "not explained"
      if shapley is not None:
        modality, phi = shapley["player_modality"][row], shapley["phi"][row]
        text_values = phi[modality == mmshap.TEXT]
        image_phi = phi[modality == mmshap.IMAGE]
        regions = [explanations.Region(box, float(v))
                   for box, v in zip(self.region_boxes(len(image_phi)), image_phi, strict=True)]
        t_shap, v_shap = float(shapley["t_shap"][row]), float(shapley["v_shap"][row])
        target, players = int(shapley["targets"][row]), int((modality >= 0).sum())
        described = (f"Shapley values of the MMBT's {value} for {names[target]!r}"
                     f"{' (its prediction)' if target == shapley['predictions'][row] else ''}, "
                     f"{'exact' if shapley['exact'][row] else 'estimated'} over {players} players.")
      votes = [(method, names[p[row].argmax()], float(p[row].max()))
               for method, p in predictions.probabilities.items()]
      cards.append(explanations.Card(
          id=products.ids[row],
          photo=input_pipeline.decode_image(products_lib.photo(products, row)),
          segments=title_segments(self.learners["mmbt"].tokenizer, products.titles[row],
                                  self.explainer.options, text_values),
          regions=regions, t_shap=t_shap, v_shap=v_shap, explained=described,
          method=predictions.method,
          top_classes=[(names[i], float(p)) for i, p in zip(top_index[row], top_probability[row])],
          votes=votes, label=None if products.labels is None else products.labels[row]))
    return cards

  def summary(self, products: Products, count: int, method: str, methods: list[str],
              explained: bool, timings: dict[str, float]) -> dict[str, Any]:
    """summary.json: `count` of `products` predicted (all, or a stream's so far), with what, and
    how fast."""
    total = sum(timings.values())
    options = dataclasses.asdict(self.explainer.options)
    return {"workdir": os.path.abspath(self.root), "source": products.source, "products": count,
            "skipped": len(products.bad_rows), "method": method, "methods": methods,
            "method_selection": self.method_selection(methods),
            "class_names": list(self.class_names), "explained": explained,
            "mmshap": {**options, "target": self.mmshap_config.target,
                       "text_masking": self.explainer_masking[0],
                       "image_masking": self.explainer_masking[1]},
            "devices": jax.device_count(), "processes": jax.process_count(),
            "timings": {**timings, "total_s": total, "products_per_s": count / max(total, 1e-9)}}

  def method_selection(self, methods: list[str]) -> dict[str, Any]:
    """What 'auto' is for predictions with `methods`, and the meta stage's evidence for it."""
    auto, passed_over = ensemble.auto_method(self.selection, methods)
    return {"auto": auto, "chosen_in_workdir": self.selection["chosen"], "passed_over": passed_over,
            **{key: self.selection[key] for key in ("rule", "metric", "scores", "scored_on",
                                                    "ranking")}}

  @property
  def explainer_masking(self) -> tuple[str, str]:
    model = self.learners["mmbt"].model
    return (self.mmshap_config.get("text_masking") or model.config.text_masking,
            self.mmshap_config.get("image_masking") or model.config.image_masking)

  def write(self, predictions: Predictions, output: str, *, top_k: int = 3,
            max_cards: int = 200) -> dict[str, Any]:
    """The output folder of predictions in memory (as `predict_to_folder` writes it; process 0
    writes): predictions.csv, summary.json, bad_rows.json, metrics.json (with labels), and with
    MM-SHAP mmshap.npz, explanations.html and explanations/<row>-<id>.png for the first
    `max_cards` (0: all)."""
    write_bad_rows(predictions.products, output)
    with OutputFolder(self, output, predictions.products, top_k=top_k,
                      max_cards=max_cards) as folder:
      folder.append(predictions)
    return folder.summary


class OutputFolder:
  """predict.py's output folder, written as chunks of predictions arrive, in input order:
  predictions.csv rows appended, mmshap.npz arrays grown (`stream_files`), the first `max_cards`
  explanation cards kept, and for metrics.json each product's label and every method's predicted
  class (small integers). Process 0 writes; every file appears whole when the `with` block ends
  without an error, and none of the streamed ones otherwise.
  """

  def __init__(self, predictor: Predictor, output: str, products: Products, *, top_k: int = 3,
               max_cards: int = 200):
    """products: all of them (their source and bad rows go into summary.json)."""
    self.predictor, self.output, self.products = predictor, output, products
    self.top_k, self.max_cards = top_k, max_cards
    self.writer = workdir.is_writer()
    self.count = 0
    self.method: str | None = None
    self.methods: list[str] = []
    self.explained = False
    self.timings: dict[str, float] = {}
    self.labels: list[np.ndarray] = []
    self.classes: dict[str, list[np.ndarray]] = {}
    self.cards: list[explanations.Card] = []
    self.table: stream_files.CsvStream | None = None
    self.shapley: stream_files.NpzStream | None = None
    self.summary: dict[str, Any] | None = None

  def __enter__(self) -> OutputFolder:
    if self.writer:
      os.makedirs(self.output, exist_ok=True)
    return self

  def append(self, predictions: Predictions) -> None:
    """The predictions of the next products (a chunk, in input order)."""
    if self.method is None:
      self.method, self.methods = predictions.method, list(predictions.probabilities)
      self.explained = predictions.shapley is not None
    for name, seconds in predictions.timings.items():
      self.timings[name] = self.timings.get(name, 0.0) + seconds
    if predictions.labels is not None:
      self.labels.append(predictions.labels)
      for method, probabilities in predictions.probabilities.items():
        self.classes.setdefault(method, []).append(probabilities.argmax(-1).astype(np.int32))
    self.count += len(predictions.products)
    if not self.writer:
      return
    header, rows = predictions.table(self.top_k)
    if self.table is None:
      self.table = stream_files.CsvStream(os.path.join(self.output, workdir.PREDICTIONS), header)
    self.table.write(csv_cells(row) for row in rows)
    if predictions.shapley is not None:
      if self.shapley is None:
        self.shapley = stream_files.NpzStream(os.path.join(self.output, workdir.SHAPLEY_VALUES),
                                              constant=CONSTANT_ARRAYS)
      self.shapley.append(predictions.shapley)
      wanted = (self.max_cards or self.count) - len(self.cards)
      if wanted > 0:
        self.cards += self.predictor.cards(predictions, top_k=self.top_k, limit=wanted)

  def metrics(self) -> dict[str, Any] | None:
    """metrics.json (`Predictions.metrics` of all the products appended)."""
    if not self.labels:
      return None
    labels = np.concatenate(self.labels)
    return {"methods": {method: metrics.classification_metrics(
        labels, np.concatenate(classes), len(self.predictor.class_names))
                        for method, classes in self.classes.items()}}

  def __exit__(self, error_type, error, traceback) -> None:
    if error_type is not None:
      for stream in (self.table, self.shapley):
        if stream is not None:
          stream.abort()
      return
    self.summary = self.predictor.summary(self.products, self.count, self.method,
                                                 self.methods, self.explained, self.timings)
    if not self.writer:
      return
    self.table.close()
    scores = self.metrics()
    if scores is not None:
      workdir.write_json(os.path.join(self.output, workdir.METRICS), scores)
    if self.shapley is not None:
      started = time.perf_counter()
      self.shapley.close()
      self._write_cards()
      self.summary["timings"]["explanations_s"] = time.perf_counter() - started
    workdir.write_json(os.path.join(self.output, workdir.SUMMARY), self.summary)
    logging.info("predictor: %d products -> %s (%s)", self.count, self.output,
                 json.dumps(self.summary["timings"]))

  def _write_cards(self) -> None:
    predictor, cards = self.predictor, self.cards
    shown = (f"{len(cards)} of {self.count} products (predict.py --max_cards)"
             if len(cards) < self.count else f"{len(cards)} products")
    notes = [f"Workdir {os.path.abspath(predictor.root)}; {shown}; ensemble method {self.method}. "
             f"MM-SHAP players: the title's words (at most "
             f"{predictor.explainer.options.max_text_players or 'all'}; trailing words merged into "
             f"the last) and {predictor.image_players_text()}."]
    workdir.write_text(os.path.join(self.output, workdir.EXPLANATIONS_HTML),
                       explanations.page(cards, "MM-SHAP explanations", notes))
    folder = os.path.join(self.output, workdir.EXPLANATION_PNGS)
    os.makedirs(folder, exist_ok=True)
    for row, card in enumerate(cards):
      workdir.write_bytes(os.path.join(folder, explanations.png_name(row, card.id)), card.png())


def predict_to_folder(predictor: Predictor, products: Products, output: str, *,
                      explain: bool = True, method: str = AUTO, top_k: int = 3,
                      max_cards: int = 200, chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
  """What predict.py does with products read: classify (and explain) them a chunk at a time
  (`chunk_size` products, rounded up by `Predictor.chunk_rows`), writing the output folder as they
  go; returns summary.json's record. Products read with `keep_photos=False` have their photos read
  per chunk, so memory holds one chunk of photos and arrays whatever the product count.
  bad_rows.json comes first, so that input whose every row was skipped still lists why."""
  write_bad_rows(products, output)
  predictor.check_products(products, explain)
  rows = predictor.chunk_rows(chunk_size)
  with OutputFolder(predictor, output, products, top_k=top_k, max_cards=max_cards) as folder:
    for start in range(0, len(products), rows):
      chunk = products_lib.subset(products, range(start, min(start + rows, len(products))))
      folder.append(predictor.predict_products(chunk, explain=explain, method=method,
                                               first_index=start))
  return folder.summary


def write_bad_rows(products: Products, output: str) -> None:
  """bad_rows.json: every row set apart, with its line and reason (process 0 writes)."""
  if workdir.is_writer():
    os.makedirs(output, exist_ok=True)
    workdir.write_json(os.path.join(output, workdir.BAD_ROWS), products.report())


def input_columns(base: Columns, **overrides: str | None) -> Columns:
  """`base` with the given names replaced (None leaves one; '' clears the label or image column)."""
  changes = {key: (value or None) if key in ("label", "image") else value
             for key, value in overrides.items() if value is not None}
  return dataclasses.replace(base, **changes)
