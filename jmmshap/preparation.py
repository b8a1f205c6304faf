"""Preparing a product catalogue (a CSV and its photos) into array_record, for the CSV builders.

Rows stream into the writer shard by shard, in CSV order within each split, while worker processes
check (fully decode) and read their photos, so preparation's memory does not grow with the
catalogue. A bad row stops preparation naming its CSV line (on_bad_row='error'), or is skipped and
listed in `bad_rows.json` next to the prepared data; `read_report(builder)` returns that report.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import importlib.resources.abc
import importlib.util
import json
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence

from absl import logging
import tensorflow_datasets as tfds

from jmmshap import catalog, parallel
from jmmshap.catalog import SPLITS, UNASSIGNED

# TFDS looks up builders defined inside a package through the `importlib_resources` backport, which it
# only declares for Python < 3.9 (tensorflow/datasets#11212). Where the backport is absent, the standard
# library module provides the one thing TFDS uses from it (`abc.Traversable`).
if importlib.util.find_spec("importlib_resources") is None:
  sys.modules["importlib_resources"] = importlib.resources

REPORT_FILE = "bad_rows.json"
_SKIP_HINT = "set --config.data.on_bad_row=skip"
_MAX_LOGGED_BAD_ROWS = 20
# A shard is written from one generator, which TFDS's ShardWriter holds whole in memory (its
# `tee`): bounding a shard's photo bytes bounds preparation's memory, whatever the catalogue size.
_SHARD_BYTES = 64 << 20
_SHARD_ROWS = 16384
# Below this many rows, starting worker processes costs more than checking the photos here.
_MIN_ROWS_FOR_WORKERS = 2000
_PHOTOS_PER_TASK = 64  # Photos a worker checks per task: amortises the inter-process round trip.
_TASKS_IN_FLIGHT_PER_WORKER = 4  # Bounds the photo bytes waiting in the pipes.


def features(class_names: Sequence[str],
              image_shape: tuple[int | None, int | None, int] = (None, None, 3),
              encoding_format: str | None = None) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "title": tfds.features.Text(),
      "image": tfds.features.Image(shape=image_shape, encoding_format=encoding_format),
      "label": tfds.features.ClassLabel(names=list(class_names)),
  })


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """Our datasets are built on this machine, never on TFDS's bucket: there is nothing to fetch, and
  TFDS's lookup would leave an empty temporary folder behind for every builder not yet prepared."""

  def initialize_from_bucket(self) -> None:
    pass


def default_prepare_workers(rows: int) -> int:
  """Processes that check photos while a catalogue is prepared: one per core from
  `_MIN_ROWS_FOR_WORKERS` rows on (the cores this process may use, as a job scheduler set them),
  none (this process) below."""
  return parallel.usable_cores() if rows >= _MIN_ROWS_FOR_WORKERS else 0


class PhotoChecker:
  """Checks and reads photos in order (`catalog.checked_photos`), in worker processes or here.

  Workers are forked from a clean server process (`forkserver`), never from this one, whose JAX
  threads make a plain fork unsafe. At most `_TASKS_IN_FLIGHT_PER_WORKER` tasks per worker are
  pending, so photo bytes never pile up ahead of the writer.
  """

  def __init__(self, workers: int):
    self.workers = workers
    self._pool = None
    if workers > 0:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("forkserver"))

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def check(self, paths: Sequence[str]):
    """Yields (encoded RGB bytes, None) or (None, problem) for each path, in order."""
    tasks = [paths[i:i + _PHOTOS_PER_TASK] for i in range(0, len(paths), _PHOTOS_PER_TASK)]
    if self._pool is None:
      for task in tasks:
        yield from catalog.checked_photos(task)
      return
    pending = collections.deque()
    window = _TASKS_IN_FLIGHT_PER_WORKER * self.workers
    try:
      for task in tasks:
        pending.append(self._pool.submit(catalog.checked_photos, task))
        if len(pending) >= window:
          yield from pending.popleft().result()
      while pending:
        yield from pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool as error:
      raise RuntimeError(
          f"a process checking photos died ({error}). Each starts a fresh interpreter that imports "
          "the main script: a script that prepares data must run from under `if __name__ == "
          "'__main__':`. Or set --config.data.prepare_workers=0 to check photos in this "
          "process.") from error


def _shards(rows: Sequence[catalog.Row]) -> list[Sequence[catalog.Row]]:
  """Consecutive runs of rows of at most `_SHARD_BYTES` photo bytes (and `_SHARD_ROWS` rows)."""
  shards, start, size = [], 0, 0
  for end, row in enumerate(rows):
    try:
      photo_bytes = os.stat(row.image_path).st_size
    except OSError:
      photo_bytes = 0  # Missing: a bad row, found when the shard is written.
    if end > start and (size + photo_bytes > _SHARD_BYTES or end - start >= _SHARD_ROWS):
      shards.append(rows[start:end])
      start, size = end, 0
    size += photo_bytes
  if start < len(rows):
    shards.append(rows[start:])
  return shards


class _Preparation:
  """What one preparation found: the bad rows (stopping at the first under on_bad_row='error')
  and the examples written per split, for the report written once every split is."""

  def __init__(self, csv_path: str, on_bad_row: str, excluded: Mapping[str, int]):
    self.csv_path, self.on_bad_row, self.excluded = csv_path, on_bad_row, excluded
    self.bad_rows: list[catalog.BadRow] = []
    self.examples = {split: 0 for split in SPLITS}

  def reject(self, bad: catalog.BadRow) -> None:
    if self.on_bad_row == "error":
      raise catalog.BadRowError(
          f"Bad row in {catalog.describe(self.csv_path, bad)}. Fix or remove the row, or "
          f"{_SKIP_HINT} to skip bad rows (they are then listed in {REPORT_FILE} next to the "
          "prepared data).")
    if len(self.bad_rows) < _MAX_LOGGED_BAD_ROWS:
      logging.warning("Skipping bad row (on_bad_row=skip): %s", catalog.describe(self.csv_path, bad))
    self.bad_rows.append(bad)


class _ShardExamples:
  """One shard's examples: its rows whose photos pass the check, in CSV order."""

  def __init__(self, builder: ProductCsvBuilder, split: str, rows: Sequence[catalog.Row]):
    self.builder, self.split, self.rows = builder, split, rows

  def __call__(self):
    preparation, checker = self.builder._preparation, self.builder._checker
    class_names = set(self.builder._config().class_names)
    checked = checker.check([row.image_path for row in self.rows])
    for row, (image, problem) in zip(self.rows, checked, strict=True):
      if problem is not None:
        preparation.reject(catalog.BadRow(self.split, row.line, row.id, row.image_path, problem))
        continue
      assert row.label in class_names, row  # _select guarantees it.
      preparation.examples[self.split] += 1
      yield row.id, {"id": row.id, "title": row.title, "image": image, "label": row.label}


STREAMED = ("Examples in CSV order within each split, written shard by shard as their photos are "
            "checked (were: in hashed key order, all held before writing).")


class ProductCsvBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Shared preparation of the CSV builders: selection, image checks, bad-row policy and report.

  Rows stream into array_record shard by shard, in CSV order within each split, their photos
  checked (fully decoded) by `photo_workers` processes (None: `default_prepare_workers`), so memory
  does not grow with the catalogue. A bad row under on_bad_row='error' stops preparation naming
  its line, and nothing prepared is left behind (TFDS writes into a folder renamed on success).
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the folder holding the product CSV and its images as "
                                  "--config.data.manual_dir.")
  photo_workers: int | None = None  # Set by `builder_for` from data.prepare_workers.
  hash_cache: str | None = None  # photo_hashes' cache file; set by `builder_for`.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self._config()
    return LocalDatasetInfo(builder=self, description=self.__doc__,
                            features=features(config.class_names))

  def _config(self):
    raise NotImplementedError

  def _read(self, manual_dir: str) -> catalog.Catalog:
    raise NotImplementedError

  def _image_dir(self, manual_dir: str) -> str:
    raise NotImplementedError

  def _select(self, products: catalog.Catalog) -> tuple[dict[str, list[catalog.Row]], list[catalog.BadRow], dict[str, int]]:
    """(rows per split, rows that are bad because of the class set, rows excluded by selection)."""
    raise NotImplementedError

  def _shard_iterators_per_split(self, dl_manager):
    config = self._config()
    products = self._read(os.fspath(dl_manager.manual_dir))
    found_sha = file_sha256(products.csv_path)
    if found_sha != config.csv_sha256:
      raise ValueError(
          f"{products.csv_path} changed since this builder config was made (sha256 {found_sha[:10]}, "
          f"config {config.csv_sha256[:10]}); make the config again (prepare() does).")
    found_images = catalog.images_fingerprint(self._image_dir(os.fspath(dl_manager.manual_dir)),
                                              products.rows, self.hash_cache)
    if found_images != config.images_sha256:
      raise ValueError(
          f"the images of {products.csv_path} changed since this builder config was made; make the "
          "config again (prepare() does).")
    rows_by_split, selection_bad_rows, excluded = self._select(products)
    self._preparation = _Preparation(products.csv_path, config.on_bad_row, excluded)
    for bad in sorted(products.bad_rows + selection_bad_rows, key=lambda bad: bad.line):
      self._preparation.reject(bad)
    for split in SPLITS:
      if not rows_by_split[split]:
        self._raise_empty(split)
    workers = self.photo_workers
    if workers is None:
      workers = default_prepare_workers(sum(map(len, rows_by_split.values())))
    logging.info("%s: checking photos in %s", self.name,
                 f"{workers} worker processes" if workers else "this process")
    self._checker = PhotoChecker(workers)
    return {split: [_ShardExamples(self, split, rows) for rows in _shards(rows_by_split[split])]
            for split in SPLITS}

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._checker = None  # Started by _shard_iterators_per_split, once the rows are counted.
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._checker is not None:
        self._checker.close()
    for split in SPLITS:
      if not self._preparation.examples[split]:
        self._raise_empty(split)
    self._write_report()

  def _raise_empty(self, split: str):
    raise ValueError(
        f"{self._preparation.csv_path}: split {split!r} has no usable rows (see the bad rows logged "
        "above, and the split column / class selection); every split needs at least one product.")

  def _write_report(self) -> None:
    preparation = self._preparation
    by_split = collections.defaultdict(list)
    for bad in sorted(preparation.bad_rows, key=lambda bad: bad.line):
      by_split[bad.split].append({"line": bad.line, "id": bad.id, "file": bad.file, "reason": bad.reason})
    excluded = preparation.excluded
    report = {
        "csv": preparation.csv_path,
        "on_bad_row": self._config().on_bad_row,
        "examples": dict(preparation.examples),
        "skipped": {split: len(by_split.get(split, [])) for split in (*SPLITS, UNASSIGNED)},
        "excluded_by_selection": {split: excluded.get(split, 0) for split in SPLITS},
        "bad_rows": {split: by_split.get(split, []) for split in (*SPLITS, UNASSIGNED)},
    }
    if preparation.bad_rows:
      logging.warning("%s: skipped %d bad rows (%s); all are listed in %s in the prepared dataset "
                      "directory.", self.name, len(preparation.bad_rows),
                      ", ".join(f"{k}: {v}" for k, v in report["skipped"].items() if v), REPORT_FILE)
    if any(excluded.values()):
      logging.info("%s: %d rows excluded by class selection (%s).", self.name, sum(excluded.values()),
                   ", ".join(f"{k}: {v}" for k, v in report["excluded_by_selection"].items()))
    # During preparation data_dir is TFDS's temporary directory, renamed with the data on success.
    with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=1)


def read_report(builder: tfds.core.DatasetBuilder) -> dict | None:
  """The bad-row / selection report of a prepared CSV dataset; None for builders that write none."""
  path = os.path.join(os.fspath(builder.data_dir), REPORT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)
