"""New products to classify: a CSV and its image folder, or rows in memory, checked as training
data is.

Every product needs an id, a title and a photo; a label is optional (with labels the predictor also
scores itself). A CSV is read by `catalog.read_products`, the reader the training builders share
(bad rows, image containment); rows handed over in memory (a pandas DataFrame, a list of dicts, one
dict) get the same checks. Every photo is decoded here, so a missing or corrupt one is found before
any model runs. A bad row (missing or corrupt photo, empty title, empty or duplicate id, a label the
workdir was not trained on) is an error naming it, or with `on_bad_row='skip'` it is set apart,
counted and listed (`Products.bad_rows`); the good rows keep their input order and their ids.

A catalogue too large to hold its photos is read with `keep_photos=False`: each photo is checked,
then dropped, and `records` reads it again for the chunk of products that needs it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from jmmshap import catalog

SOURCE_ROWS = "rows"  # Products.source of rows handed over in memory.
NO_SPLIT = "predict"  # BadRow.split of a new product.
_SKIP_HINT = "pass --on_bad_row=skip (on_bad_row='skip') to skip bad rows; they are then listed"


@dataclasses.dataclass(frozen=True)
class Columns:
  """Where a product's fields are: the CSV's column names (or the rows' keys), the CSV's name in an
  input folder and the image folder's. `image` None: the photo is `{image_dir}/{id}.jpg`."""
  id: str = "id"
  title: str = "title"
  label: str | None = "label"
  image: str | None = "image"
  csv: str = "products.csv"
  image_dir: str = "images"


def default_columns(data_config: ml_collections.ConfigDict) -> Columns:
  """The columns of the data a workdir was trained on: a product folder's configured names, the
  fashion catalogue's, and for toyshop (no CSV) id, title, label and an image column (what
  `toyshop.write_products` writes)."""
  name = data_config.get("name")
  if name == "product_folder":
    return Columns(id=data_config.get("id_column") or "id",
                   title=data_config.get("text_column") or "text",
                   label=data_config.get("label_column") or "label",
                   image=data_config.get("image_column") or None,
                   csv=data_config.get("csv") or "products.csv",
                   image_dir=data_config.get("image_dir") or "images")
  if name == "fashion_products":
    return Columns(id="id", title="title", label=data_config.get("label_field") or "article_type",
                   image=None, csv=catalog.FASHION_CSV, image_dir="images")
  return Columns()


@dataclasses.dataclass
class Products:
  """Checked products in input order; bad rows set apart (with on_bad_row='skip')."""
  ids: list[str]
  titles: list[str]
  # Encoded RGB JPEG/PNG bytes, or uint8 (H, W, 3); or the checked photo's path (str), read when
  # needed (`read_csv(keep_photos=False)`, `photo`).
  images: list[bytes | np.ndarray | str]
  labels: list[str] | None  # None: the input has no labels.
  lines: list[int]  # The CSV line (or 1-based row number) of each product.
  source: str  # The CSV read, or SOURCE_ROWS.
  bad_rows: list[catalog.BadRow]
  on_bad_row: str = "error"

  def __len__(self) -> int:
    return len(self.ids)

  def describe(self, bad: catalog.BadRow) -> str:
    if self.source == SOURCE_ROWS:
      what = bad.reason if bad.file == SOURCE_ROWS else f"{bad.reason}: {bad.file}"
      return f"row {bad.line} (id {bad.id!r}): {what}"
    return catalog.describe(self.source, bad)

  def report(self) -> dict[str, Any]:
    """bad_rows.json: what was read, what was skipped and why (as the builders' report)."""
    return {"source": self.source, "on_bad_row": self.on_bad_row, "products": len(self),
            "skipped": len(self.bad_rows),
            "bad_rows": [{"line": bad.line, "id": bad.id, "file": bad.file, "reason": bad.reason}
                         for bad in self.bad_rows]}


def _apply_policy(products: Products) -> Products:
  """on_bad_row='error': the first bad row (in input order) is an error naming it; 'skip' keeps
  them listed."""
  catalog.check_on_bad_row(products.on_bad_row)
  products.bad_rows.sort(key=lambda bad: bad.line)
  if products.bad_rows and products.on_bad_row == "error":
    count = len(products.bad_rows)
    raise catalog.BadRowError(
        f"Bad row in {products.describe(products.bad_rows[0])}"
        + (f" ({count} bad rows in all)" if count > 1 else "")
        + f". Fix or remove it, or {_SKIP_HINT} in bad_rows.json.")
  return products


def _label_problem(label: str | None, class_names: Sequence[str]) -> str | None:
  if label is not None and label not in class_names:
    return (f"label {label!r} is not one of the {len(class_names)} classes the workdir was trained "
            "on")
  return None


def read_csv(csv_path: str, class_names: Sequence[str], *, columns: Columns = Columns(),
             image_dir: str | None = None, on_bad_row: str = "error",
             keep_photos: bool = True) -> Products:
  """New products from a CSV; photos in `image_dir` (default: `columns.image_dir` beside the CSV).

  Labels are read when the CSV has `columns.label`; a CSV without an id or title column, or
  without the named image column, is an error naming the columns it has. keep_photos=False: every
  photo is decoded (checked) and dropped; `Products.images` holds the paths.
  """
  if image_dir is None:
    image_dir = os.path.join(os.path.dirname(os.path.abspath(csv_path)), columns.image_dir)
  read = catalog.read_products(csv_path, id_column=columns.id, text_column=columns.title,
                               image_column=columns.image, image_dir=image_dir,
                               label_column=columns.label)
  products = Products([], [], [], [] if read.labelled else None, [], read.csv_path,
                      list(read.bad_rows), on_bad_row)
  for row in read.rows:
    problem, file = _label_problem(row.label, class_names), read.csv_path
    if problem is None:
      try:
        data, _ = catalog.encoded_rgb_image(row.image_path)
      except catalog.ImageProblem as error:
        problem, file = error.reason, row.image_path
    if problem is not None:
      products.bad_rows.append(catalog.BadRow(NO_SPLIT, row.line, row.id, file, problem))
      continue
    _append(products, row.line, row.id, row.title, data if keep_photos else row.image_path,
            row.label)
  return _apply_policy(products)


def _append(products: Products, line: int, product_id: str, title: str,
            image: bytes | np.ndarray, label: str | None) -> None:
  products.ids.append(product_id)
  products.titles.append(title)
  products.images.append(image)
  products.lines.append(line)
  if products.labels is not None:
    products.labels.append(label)


def _missing(value: Any) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def photo_from(value: Any, image_dir: str | None = None) -> tuple[bytes | np.ndarray | None, str,
                                                                  str | None]:
  """(photo, where it came from, problem) of a row's image value: a path (inside `image_dir` when
  given), encoded bytes, a PIL image or a uint8 array."""
  if _missing(value):
    return None, SOURCE_ROWS, "no image"
  if isinstance(value, (str, os.PathLike)):
    path = os.fspath(value)
    if image_dir is not None:
      root = os.path.realpath(image_dir)
      path = catalog.contained(root, path)
      if path is None:
        return None, SOURCE_ROWS, f"image path {os.fspath(value)!r} leads outside the image folder {image_dir}"
    try:
      return catalog.encoded_rgb_image(path)[0], path, None
    except catalog.ImageProblem as error:
      return None, path, error.reason
  if isinstance(value, (bytes, bytearray)):
    try:
      return catalog.encoded_rgb_bytes(bytes(value))[0], SOURCE_ROWS, None
    except catalog.ImageProblem as error:
      return None, SOURCE_ROWS, error.reason
  if isinstance(value, Image.Image):
    value = np.asarray(value.convert("RGB"))
  array = np.asarray(value)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
    return None, SOURCE_ROWS, (f"an image array must be uint8 (H, W, 3) or (H, W); got "
                               f"{array.dtype} {array.shape}")
  return array, SOURCE_ROWS, None


def from_rows(rows: Any, class_names: Sequence[str], *, columns: Columns = Columns(),
              image_dir: str | None = None, on_bad_row: str = "error") -> Products:
  """New products from rows in memory: a pandas DataFrame, an iterable of mappings, or one mapping.

  A row's image is a path (inside `image_dir` when given), encoded bytes, a PIL image or a uint8
  array. Labels are read when some row has `columns.label`.
  """
  if isinstance(rows, Products):
    return rows
  if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # A pandas DataFrame.
    rows = rows.to_dict("records")
  elif isinstance(rows, Mapping):
    rows = [rows]
  rows = list(rows)
  if not rows:
    raise ValueError("no products to classify: the rows are empty.")
  keys = sorted({key for row in rows for key in row})
  image_key = columns.image or "image"
  missing = [key for key in (columns.id, columns.title, image_key) if key not in keys]
  if missing:
    raise ValueError(f"the rows have no {', '.join(map(repr, missing))} field(s); they have "
                     f"{', '.join(map(repr, keys))}. Name the fields with the column settings "
                     "(id, title, image).")
  labelled = columns.label is not None and columns.label in keys
  products = Products([], [], [], [] if labelled else None, [], SOURCE_ROWS, [], on_bad_row)
  first_row_of_id: dict[str, int] = {}
  for number, row in enumerate(rows, start=1):
    product_id = "" if _missing(row.get(columns.id)) else str(row.get(columns.id)).strip()
    title = "" if _missing(row.get(columns.title)) else str(row.get(columns.title)).strip()
    label = row.get(columns.label) if labelled else None
    label = None if _missing(label) else str(label).strip()
    problem, file, photo = None, SOURCE_ROWS, None
    if not product_id:
      problem = f"empty id in field {columns.id!r}"
    elif product_id in first_row_of_id:
      problem = f"duplicate id {product_id!r} (first on row {first_row_of_id[product_id]})"
    elif catalog.is_blank(title):
      problem = f"empty title in field {columns.title!r}"
    elif labelled and not label:
      problem = f"empty label in field {columns.label!r}"
    else:
      problem = _label_problem(label, class_names)
    if problem is None:
      photo, file, problem = photo_from(row.get(image_key), image_dir)
    if problem is not None:
      products.bad_rows.append(catalog.BadRow(NO_SPLIT, number, product_id, file, problem))
      continue
    first_row_of_id[product_id] = number
    _append(products, number, product_id, title, photo, label)
  return _apply_policy(products)


def single(title: str, image: Any, class_names: Sequence[str], *, product_id: str = "product",
           label: str | None = None) -> Products:
  """One product (`predict.py --title=... --image=path`)."""
  row = {"id": product_id, "title": title, "image": image}
  if label is not None:
    row["label"] = label
  return from_rows([row], class_names, columns=Columns())


def photo(products: Products, row: int) -> bytes | np.ndarray:
  """A product's photo: as held, or read from its path (the bytes `read_csv` checked); a photo
  that went bad since it was checked names its row."""
  image = products.images[row]
  if not isinstance(image, str):
    return image
  try:
    return catalog.encoded_rgb_image(image)[0]
  except catalog.ImageProblem as error:
    bad = catalog.BadRow(NO_SPLIT, products.lines[row], products.ids[row], products.images[row],
                         error.reason)
    raise catalog.BadRowError(f"Bad row in {products.describe(bad)}: the photo was good when the "
                              "products were read and changed since. Fix it and run again."
                              ) from None


def records(products: Products, class_names: Sequence[str]) -> list[dict[str, Any]]:
  """The products as the stages' records (id, title, image, label index; -1 without a label), a
  random-access source for `input_pipeline` batches; photos held as paths are read here."""
  index = {name: i for i, name in enumerate(class_names)}
  labels = products.labels if products.labels is not None else [None] * len(products)
  rows = enumerate(zip(products.ids, products.titles, labels, strict=True))
  return [{"id": product_id, "title": title, "image": photo(products, row),
           "label": -1 if label is None else index[label]}
          for row, (product_id, title, label) in rows]


def subset(products: Products, rows: Iterable[int]) -> Products:
  """Some of the products (their bad rows kept), in the order given."""
  rows = list(rows)
  pick = lambda values: [values[i] for i in rows]
  return dataclasses.replace(
      products, ids=pick(products.ids), titles=pick(products.titles), images=pick(products.images),
      labels=None if products.labels is None else pick(products.labels), lines=pick(products.lines))
