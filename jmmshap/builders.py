"""TFDS builders for the product datasets, written as array_record and read with `as_data_source`.

Every builder has the same features, so the input pipeline never branches on the dataset:
`id` (Text), `title` (Text), `image` (Image, HxWx3 uint8), `label` (ClassLabel), and the splits
`train`, `validation`, `test`. No TensorFlow is needed to build or read: images are stored as their
encoded JPEG/PNG bytes and `builder.as_data_source(split)[i]` decodes them with PIL, giving
`{'id': bytes, 'title': bytes, 'image': uint8 HxWx3, 'label': int}` (Text comes back as UTF-8 bytes).

- `Toyshop`: the generated dataset of `jmmshap.toyshop`; its class reliance metadata (the MM-SHAP ground
  truth) is stored in `info.metadata` and read back with `class_reliance(builder)`.
- `FashionProducts`: the `fashion-products` folder (products.csv + images/{id}.jpg, fixed `split` column).
- `ProductFolder`: any folder of images plus a CSV of id, text, label (see the class docstring).

A builder config's name ends in a hash of every setting that changes the prepared data (and, for the CSV
builders, of the CSV's content), so two settings never share a prepared cache. `prepare(data_config)` is
the one entry point for the pipeline.

The CSV builders prepare through `preparation` (rows streamed shard by shard, photos checked in worker
processes, `data.prepare_workers`); each catalogue's photos are fingerprinted through the
`photo_hashes` cache, once per main job (`catalogues_read_once`).

Bad rows of the CSV builders (missing or corrupt image, empty title, label outside the class set, bytes
that are not UTF-8, ...) stop preparation with an error naming the CSV line and file, or, with
`on_bad_row='skip'`, are skipped, logged and listed in `bad_rows.json` next to the prepared data.
Rows whose label is outside a *selected* class subset (FashionProducts' top_k/min_count) are not bad:
they are excluded by design, and counted in the same report. `read_report(builder)` returns it:
{'csv', 'on_bad_row', 'examples': {split: n}, 'skipped': {split: n}, 'excluded_by_selection':
{split: n}, 'bad_rows': {split: [{'line', 'id', 'file', 'reason'}]}}, where `line` is the CSV line the
row starts on and bad rows whose split is unknown are under 'unassigned'.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds

from jmmshap import catalog, photo_hashes, preparation, toyshop
# Re-exported: the splits, and the errors a bad CSV raises, are part of what a builder means.
from jmmshap.catalog import (EVAL_SPLITS, ON_BAD_ROW, SPLITS, UNASSIGNED, BadRow, BadRowError,  # noqa: F401
                             CsvFormatError)
from jmmshap.preparation import REPORT_FILE, read_report  # noqa: F401


def _settings_hash(settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------------
# Toyshop.


@dataclasses.dataclass(eq=False)
class ToyshopConfig(tfds.core.BuilderConfig):
  spec: toyshop.ToyshopSpec = dataclasses.field(default_factory=toyshop.ToyshopSpec)


def toyshop_config(spec: toyshop.ToyshopSpec) -> ToyshopConfig:
  """A config named after the spec and the generator version, so each spec gets its own cache."""
  # Without the shortcut the spec hashes as before the option existed: same data, same cache.
  fields = {key: value for key, value in dataclasses.asdict(spec).items()
            if not (key == "shortcut_strength" and value is None)}
  settings = {"spec": fields, "generator_version": toyshop.GENERATOR_VERSION}
  return ToyshopConfig(
      name=f"{spec.num_classes}classes-{spec.image_size}px-seed{spec.seed}-{_settings_hash(settings)}",
      description=f"Toyshop generated from {spec}.",
      spec=spec)


class Toyshop(tfds.core.GeneratorBasedBuilder):
  """The generated toyshop dataset; class reliance (MM-SHAP ground truth) is in info.metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    spec = _require_config(self, ToyshopConfig, "toyshop_config(spec)").spec
    infos = toyshop.classes(spec)
    return preparation.LocalDatasetInfo(
        builder=self,
        description="Generated products whose per-class modality reliance is known (jmmshap.toyshop).",
        features=preparation.features([c.name for c in infos], (spec.image_size, spec.image_size, 3), "png"),
        metadata=tfds.core.MetadataDict(
            class_reliance=[dataclasses.asdict(c) for c in infos],
            spec=dataclasses.asdict(spec),
            generator_version=toyshop.GENERATOR_VERSION),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is code.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for example in toyshop.examples(self.builder_config.spec, split):
      yield example["id"], example


def _require_config(builder: tfds.core.DatasetBuilder, config_type: type, factory: str):
  config = builder.builder_config
  if not isinstance(config, config_type):
    raise ValueError(
        f"{type(builder).__name__} needs a {config_type.__name__} (got {config!r}): build it with "
        f"jmmshap.builders.prepare(data_config), or pass config={factory}.")
  return config


# ---------------------------------------------------------------------------------------------------
# FashionProducts.

@dataclasses.dataclass(eq=False)
class FashionProductsConfig(tfds.core.BuilderConfig):
  label_field: str = "article_type"
  top_k: int | None = 31
  min_count: int | None = None
  on_bad_row: str = "error"
  csv_sha256: str = ""
  images_sha256: str = ""  # catalog.images_fingerprint of the CSV's images.
  class_names: tuple[str, ...] = ()


def select_classes(label_counts: Mapping[str, int], top_k: int | None,
                   min_count: int | None) -> list[str]:
  """Classes with >= min_count items, then the top_k most frequent of those; ties broken by name."""
  ranked = sorted(label_counts, key=lambda name: (-label_counts[name], name))
  if min_count is not None:
    ranked = [name for name in ranked if label_counts[name] >= min_count]
  if top_k is not None:
    ranked = ranked[:top_k]
  return ranked


def fashion_products_config(manual_dir: str, *, label_field: str = "article_type",
                            top_k: int | None = 31, min_count: int | None = None,
                            on_bad_row: str = "error",
                            hash_cache: str | None = None) -> FashionProductsConfig:
  """Reads the CSV to fix the class set (from counts over the whole file) and the cache name;
  `hash_cache`: the photo_hashes cache file (None: every photo is read)."""
  catalog.check_on_bad_row(on_bad_row)
  if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
    raise ValueError(f"fashion_products top_k={top_k!r}: expected a positive int or None (all).")
  if min_count is not None and (not isinstance(min_count, int) or min_count < 0):
    raise ValueError(f"fashion_products min_count={min_count!r}: expected an int >= 0 or None.")
  min_count = min_count or None  # 0 selects like no minimum, so it shares that cache.
  products = catalog.fashion_catalog(manual_dir, label_field)
  counts = collections.Counter(row.label for row in products.rows)
  class_names = select_classes(counts, top_k, min_count)
  if not class_names:
    raise ValueError(f"{products.csv_path}: no {label_field} class has at least {min_count} items.")
  csv_sha256 = preparation.file_sha256(products.csv_path)
  images_sha256 = catalog.images_fingerprint(catalog.fashion_image_dir(manual_dir), products.rows,
                                             hash_cache)
  settings = dict(label_field=label_field, top_k=top_k, min_count=min_count, on_bad_row=on_bad_row,
                  csv_sha256=csv_sha256, images_sha256=images_sha256)
  selection = (f"top{top_k}" if top_k is not None else "") + (
      f"min{min_count}" if min_count is not None else "") or "all"
  return FashionProductsConfig(
      name=f"{label_field}-{selection}-{_settings_hash(settings)}",
      description=f"{len(class_names)} {label_field} classes ({selection}), on_bad_row={on_bad_row}.",
      label_field=label_field, top_k=top_k, min_count=min_count, on_bad_row=on_bad_row,
      csv_sha256=csv_sha256, images_sha256=images_sha256, class_names=tuple(class_names))


class FashionProducts(preparation.ProductCsvBuilder):
  """Myntra fashion products (products.csv + images/{id}.jpg), its fixed split, a selected class set."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": preparation.STREAMED}

  def _config(self) -> FashionProductsConfig:
    return _require_config(self, FashionProductsConfig, "fashion_products_config(manual_dir, ...)")

  def _read(self, manual_dir: str) -> catalog.Catalog:
    return catalog.fashion_catalog(manual_dir, self._config().label_field)

  def _image_dir(self, manual_dir: str) -> str:
    return catalog.fashion_image_dir(manual_dir)

  def _select(self, products):
    class_names = set(self._config().class_names)
    rows_by_split = {split: [] for split in SPLITS}
    excluded = collections.Counter()
    for row in products.rows:
      if row.label in class_names:
        rows_by_split[row.split].append(row)
      else:
        excluded[row.split] += 1
    return rows_by_split, [], dict(excluded)


# ---------------------------------------------------------------------------------------------------
# ProductFolder.


@dataclasses.dataclass(eq=False)
class ProductFolderConfig(tfds.core.BuilderConfig):
  csv: str = "products.csv"
  image_dir: str = "images"
  id_column: str = "id"
  text_column: str = "text"
  label_column: str = "label"
  split_column: str | None = None
  image_column: str | None = None
  classes: tuple[str, ...] | None = None
  split_seed: int = 0
  on_bad_row: str = "error"
  csv_sha256: str = ""
  images_sha256: str = ""  # catalog.images_fingerprint of the CSV's images.
  class_names: tuple[str, ...] = ()


_SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.2}  # The rest, 70%, is train.


def _stratified_split(rows: Sequence[catalog.Row], seed: int) -> dict[str, list[catalog.Row]]:
  """A seeded 70/10/20 split per label; each label is shuffled by its own seed, so adding rows of one
  label never moves another's, and every label keeps at least one train row."""
  by_label = collections.defaultdict(list)
  for row in rows:
    by_label[row.label].append(row)
  assigned = {}
  for label, group in by_label.items():
    rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
    order = rng.permutation(len(group))
    num_validation = int(len(group) * _SPLIT_FRACTIONS["validation"])
    num_test = int(len(group) * _SPLIT_FRACTIONS["test"])
    for position, row_index in enumerate(order):
      split = ("validation" if position < num_validation else
               "test" if position < num_validation + num_test else "train")
      assigned[group[row_index].line] = split
  rows_by_split = {split: [] for split in SPLITS}
  for row in rows:  # CSV order within each split.
    rows_by_split[assigned[row.line]].append(dataclasses.replace(row, split=assigned[row.line]))
  return rows_by_split


def _product_folder_catalog(manual_dir: str, config: ProductFolderConfig) -> catalog.Catalog:
  return catalog.read_catalog(
      os.path.join(manual_dir, config.csv), id_column=config.id_column,
      text_column=config.text_column, label_column=config.label_column,
      split_column=config.split_column, image_column=config.image_column,
      image_dir=os.path.join(manual_dir, config.image_dir))


def _product_folder_split(products: catalog.Catalog, config: ProductFolderConfig) -> dict[str, list[catalog.Row]]:
  if config.split_column:
    rows_by_split = {split: [] for split in SPLITS}
    for row in products.rows:
      rows_by_split[row.split].append(row)
    return rows_by_split
  return _stratified_split(products.rows, config.split_seed)


def product_folder_config(manual_dir: str, *, csv: str = "products.csv", image_dir: str = "images",
                          id_column: str = "id", text_column: str = "text",
                          label_column: str = "label", split_column: str | None = None,
                          image_column: str | None = None, classes: Sequence[str] | None = None,
                          split_seed: int = 0, on_bad_row: str = "error",
                          hash_cache: str | None = None) -> ProductFolderConfig:
  """Reads the CSV to fix the class set (explicit, or the sorted train labels) and the cache name;
  `hash_cache`: the photo_hashes cache file (None: every photo is read)."""
  catalog.check_on_bad_row(on_bad_row)
  if classes is not None:
    classes = tuple(str(name).strip() for name in classes)
    duplicates = sorted(name for name, n in collections.Counter(classes).items() if n > 1)
    if duplicates or not classes or not all(classes):
      raise ValueError(f"product_folder classes={list(classes)!r}: need distinct, non-empty names "
                       f"(duplicated: {duplicates}).")
  config = ProductFolderConfig(
      name="unnamed", csv=csv, image_dir=image_dir, id_column=id_column, text_column=text_column,
      label_column=label_column, split_column=split_column or None, image_column=image_column or None,
      classes=classes, split_seed=split_seed, on_bad_row=on_bad_row)
  products = _product_folder_catalog(manual_dir, config)
  if classes is not None:
    class_names = classes
  else:
    class_names = tuple(sorted({row.label for row in _product_folder_split(products, config)["train"]}))
    if not class_names:
      raise ValueError(f"{products.csv_path}: no usable train rows, so no class set; fix the CSV or "
                       "pass an explicit classes list.")
  csv_sha256 = preparation.file_sha256(products.csv_path)
  images_sha256 = catalog.images_fingerprint(os.path.join(manual_dir, image_dir), products.rows,
                                             hash_cache)
  # The CSV and images are identified by their content (and the images' sizes and times), not by
  # where they live, so a moved folder keeps its cache.
  settings = dict(image_dir=config.image_dir, id_column=id_column, text_column=text_column,
                  label_column=label_column, split_column=config.split_column,
                  image_column=config.image_column, classes=classes, split_seed=split_seed,
                  on_bad_row=on_bad_row, csv_sha256=csv_sha256, images_sha256=images_sha256)
  return dataclasses.replace(
      config, name=f"{len(class_names)}classes-{_settings_hash(settings)}",
      description=f"{len(class_names)} classes from {csv}, on_bad_row={on_bad_row}.",
      csv_sha256=csv_sha256, images_sha256=images_sha256, class_names=class_names)


class ProductFolder(preparation.ProductCsvBuilder):
  """A folder of product images plus a CSV, in the layout of TAIMD-17k style catalogues.

  The CSV (UTF-8, with a header row) has one row per product with these columns (names configurable):
  - `id`: unique product id; by default also the image name, `{image_dir}/{id}.jpg`;
  - `text`: the product title or description (non-empty);
  - `label`: the class name;
  - optional split column: `train` / `validation` / `test` per row; without one, a seeded stratified
    70/10/20 split per label (`split_seed`);
  - optional image column: the image path relative to `image_dir` (or absolute), replacing `{id}.jpg`.
  The class set is the explicit `classes` list, or the sorted labels of the train split; a row whose
  label is outside it is a bad row. Images may be any format PIL reads; non-RGB JPEG/PNG or other
  formats are stored as RGB PNG.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": preparation.STREAMED}

  def _config(self) -> ProductFolderConfig:
    return _require_config(self, ProductFolderConfig, "product_folder_config(manual_dir, ...)")

  def _read(self, manual_dir: str) -> catalog.Catalog:
    return _product_folder_catalog(manual_dir, self._config())

  def _image_dir(self, manual_dir: str) -> str:
    return os.path.join(manual_dir, self._config().image_dir)

  def _select(self, products):
    config = self._config()
    class_names = set(config.class_names)
    rows_by_split = _product_folder_split(products, config)
    bad_rows = []
    for split, rows in rows_by_split.items():
      kept = []
      for row in rows:
        if row.label in class_names:
          kept.append(row)
        elif config.classes is not None:
          bad_rows.append(BadRow(split, row.line, row.id, products.csv_path,
                                 f"label {row.label!r} is not in the configured classes"))
        else:
          bad_rows.append(BadRow(split, row.line, row.id, products.csv_path,
                                 f"label {row.label!r} does not occur in the train split"))
      rows_by_split[split] = kept
    return rows_by_split, bad_rows, {}


# ---------------------------------------------------------------------------------------------------
# Entry points.

_TOYSHOP_FIELDS = tuple(field.name for field in dataclasses.fields(toyshop.ToyshopSpec))


def _toyshop_spec(data_config: ml_collections.ConfigDict) -> toyshop.ToyshopSpec:
  overrides = data_config.get("toyshop") or {}
  if hasattr(overrides, "to_dict"):
    overrides = overrides.to_dict()
  unknown = sorted(set(overrides) - set(_TOYSHOP_FIELDS))
  if unknown:
    raise ValueError(f"data.toyshop has unknown key(s) {', '.join(unknown)}; the spec fields are "
                     f"{', '.join(_TOYSHOP_FIELDS)}.")
  return toyshop.ToyshopSpec(**overrides)


def _manual_dir(data_config: ml_collections.ConfigDict, what: str) -> str:
  manual_dir = data_config.get("manual_dir")
  if not manual_dir or not os.path.isdir(manual_dir):
    raise CsvFormatError(f"data.manual_dir={manual_dir!r} is not a folder; set "
                         f"--config.data.manual_dir to the folder holding {what}.")
  return os.path.abspath(os.path.expanduser(manual_dir))


_configs_of_this_job: dict[str, tfds.core.BuilderConfig] | None = None


@contextlib.contextmanager
def catalogues_read_once():
  """Within it (a main job), each product catalogue is read and its photos fingerprinted once,
  however many stages build its dataset config; outside, every call reads them anew."""
  global _configs_of_this_job
  outer = _configs_of_this_job
  _configs_of_this_job = {} if outer is None else outer  # A nested job shares the outer's.
  try:
    yield
  finally:
    _configs_of_this_job = outer


def _catalogue_config(make: Any, manual_dir: str, **settings: Any) -> tfds.core.BuilderConfig:
  if _configs_of_this_job is None:
    return make(manual_dir, **settings)
  key = json.dumps([make.__name__, manual_dir, settings], sort_keys=True, default=str)
  if key not in _configs_of_this_job:
    _configs_of_this_job[key] = make(manual_dir, **settings)
  return _configs_of_this_job[key]


def hash_cache_path(data_config: ml_collections.ConfigDict) -> str:
  """This host's photo_hashes cache, beside the prepared datasets."""
  data_dir = data_config.get("data_dir") or tfds.core.constants.DATA_DIR
  return photo_hashes.default_cache_path(os.path.expanduser(data_dir))


def builder_for(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder and its config for `data_config`, not yet prepared (see `prepare`)."""
  name = data_config.get("name")
  data_dir = data_config.get("data_dir")
  on_bad_row = catalog.check_on_bad_row(data_config.get("on_bad_row") or "error")
  if name == "toyshop":
    return Toyshop(config=toyshop_config(_toyshop_spec(data_config)), data_dir=data_dir,
                   file_format="array_record")
  hash_cache = hash_cache_path(data_config)
  if name == "fashion_products":
    config = _catalogue_config(
        fashion_products_config, _manual_dir(data_config, "products.csv and images/"),
        label_field=data_config.get("label_field") or "article_type",
        top_k=data_config.get("top_k", 31) or None, min_count=data_config.get("min_count"),
        on_bad_row=on_bad_row, hash_cache=hash_cache)
    builder = FashionProducts(config=config, data_dir=data_dir, file_format="array_record")
  elif name == "product_folder":
    classes = data_config.get("classes")
    config = _catalogue_config(
        product_folder_config, _manual_dir(data_config, "the product CSV and images"),
        csv=data_config.get("csv") or "products.csv",
        image_dir=data_config.get("image_dir") or "images",
        id_column=data_config.get("id_column") or "id",
        text_column=data_config.get("text_column") or "text",
        label_column=data_config.get("label_column") or "label",
        split_column=data_config.get("split_column"), image_column=data_config.get("image_column"),
        classes=None if classes is None else tuple(classes),
        split_seed=data_config.get("split_seed") or 0, on_bad_row=on_bad_row,
        hash_cache=hash_cache)
    builder = ProductFolder(config=config, data_dir=data_dir, file_format="array_record")
  else:
    raise ValueError(f"data.name={name!r}; expected one of toyshop, fashion_products, product_folder.")
  builder.photo_workers = data_config.get("prepare_workers")
  builder.hash_cache = hash_cache
  return builder


def prepare(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Builds the dataset once (array_record) and returns its builder, ready for `as_data_source`."""
  builder = builder_for(data_config)
  manual_dir = data_config.get("manual_dir") if data_config.get("name") != "toyshop" else None
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else None,
          try_download_gcs=False))
  return builder


def identity(builder: tfds.core.DatasetBuilder) -> str:
  """Names the prepared data a builder stands for: its full name hashes every setting that changes
  it, and for the CSV builders the CSV's content and the images' sizes and times."""
  return builder.info.full_name


def prepare_in_process_order(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """`prepare` in a job of several processes: process 0 builds the dataset alone; the others then
  find it ready (on a shared disk) or build their own copy, never racing process 0 into the same
  folder."""
  builder = prepare(data_config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jmmshap: dataset prepared")
  return builder if builder is not None else prepare(data_config)


def data_source(builder: tfds.core.DatasetBuilder, split: str) -> Any:
  """A prepared split for the input pipeline: random access, photos left as their encoded bytes
  (`input_pipeline.decode_image` decodes them in grain's workers, at the size a stage reads)."""
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def class_reliance(builder: tfds.core.DatasetBuilder) -> list[dict] | None:
  """Per-class designed reliance (name, reliance, text_share) of toyshop data; None for real data."""
  metadata = builder.info.metadata
  if not metadata or "class_reliance" not in metadata:
    return None
  return [dict(entry) for entry in metadata["class_reliance"]]
