"""Reading a product CSV and its images: every row checked, the bad ones set apart with a reason.

Shared by the CSV builders (`builders.FashionProducts`, `builders.ProductFolder`) and by anything
else that reads a catalogue the way they do (scripts/baselines.py). A row is bad when it cannot be
an example whatever the images hold (wrong field count, bytes that are not UTF-8, unknown split,
empty or duplicate id, empty title or label) or when its image is missing, unreadable or corrupt.
Bad rows are reported with their CSV line; what happens to them (stop or skip) is the
`on_bad_row` policy of the caller.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

from PIL import Image

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")  # What the learners are evaluated and stacked on.
ON_BAD_ROW = ("error", "skip")
UNASSIGNED = "unassigned"  # Report key for bad rows whose split is unknown (e.g. its split value is bad).
FASHION_CSV = "products.csv"


class BadRowError(ValueError):
  """A CSV row that cannot become an example, with on_bad_row='error'."""


class CsvFormatError(ValueError):
  """A CSV that cannot be read at all (missing column, undecodable header, ...): no skip possible."""


@dataclasses.dataclass(frozen=True)
class BadRow:
  """One skipped row, as listed in bad_rows.json."""
  split: str
  line: int
  id: str
  file: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Row:
  line: int
  id: str
  title: str
  label: str
  split: str | None
  image_path: str


@dataclasses.dataclass
class Catalog:
  csv_path: str
  rows: list[Row]
  bad_rows: list[BadRow]


def _printable(text: str) -> str:
  """Text with undecodable bytes (kept as surrogates) shown as U+FFFD, safe to print and to JSON."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _first_bad_byte(text: str) -> str:
  for char in text:
    if "\udc80" <= char <= "\udcff":
      return f"0x{ord(char) - 0xdc00:02x}"
  return "?"


def read_catalog(csv_path: str, *, id_column: str, text_column: str, label_column: str,
                  split_column: str | None, image_column: str | None, image_dir: str) -> Catalog:
  """Parses every row, setting apart the ones that cannot be an example whatever the images hold."""
  if not os.path.isfile(csv_path):
    raise CsvFormatError(f"{csv_path}: no such CSV file. Point the data config at the product CSV.")
  with open(csv_path, "rb") as f:
    raw = f.read()
  # surrogateescape keeps undecodable bytes, so one bad row is reported instead of the whole file.
  text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  if header is None:
    raise CsvFormatError(f"{csv_path}: the file is empty; expected a header row and product rows.")
  if any(_printable(name) != name for name in header):
    raise CsvFormatError(f"{csv_path}, line 1: the header is not valid UTF-8; re-save the file as UTF-8.")
  header = [name.strip() for name in header]
  wanted = {"id": id_column, "text": text_column, "label": label_column}
  if split_column:
    wanted["split"] = split_column
  if image_column:
    wanted["image"] = image_column
  missing = sorted(column for column in wanted.values() if column not in header)
  if missing:
    raise CsvFormatError(
        f"{csv_path}: no column(s) {', '.join(map(repr, missing))}; the header has "
        f"{', '.join(map(repr, header))}. Set the data config's column names to match the file.")
  index = {role: header.index(column) for role, column in wanted.items()}

  rows, bad_rows, first_line_of_id = [], [], {}
  while True:
    line = reader.line_num + 1  # Where the next row starts (a quoted field may span lines).
    record = next(reader, None)
    if record is None:
      break
    if not record:
      continue  # A blank line holds no product.
    values = {role: record[i].strip() if i < len(record) else "" for role, i in index.items()}
    split = values["split"].lower() if split_column else None
    undecodable = [name for name, value in zip(header, record) if _printable(value) != value]
    if len(record) != len(header):
      reason = f"the row has {len(record)} fields but the header has {len(header)}"
    elif undecodable:
      reason = (f"not valid UTF-8 (byte {_first_bad_byte(''.join(record))} in column(s) "
                f"{', '.join(undecodable)}); re-save the CSV as UTF-8")
    elif split_column and split not in SPLITS:
      reason = f"split {values['split']!r} in column {split_column!r} is not one of {', '.join(SPLITS)}"
    elif not values["id"]:
      reason = f"empty id in column {id_column!r}"
    elif values["id"] in first_line_of_id:
      reason = f"duplicate id {values['id']!r} (first on line {first_line_of_id[values['id']]})"
    elif not values["text"]:
      reason = f"empty title in column {text_column!r}"
    elif not values["label"]:
      reason = f"empty label in column {label_column!r}"
    elif image_column and not values["image"]:
      reason = f"empty image path in column {image_column!r}"
    else:
      reason = None
    if reason is not None:
      bad_rows.append(BadRow(split if split in SPLITS else UNASSIGNED, line,
                             _printable(values["id"]), csv_path, reason))
      continue
    first_line_of_id[values["id"]] = line
    image_name = values["image"] if image_column else f"{values['id']}.jpg"
    rows.append(Row(line, values["id"], values["text"], values["label"], split,
                     os.path.join(image_dir, image_name)))
  return Catalog(csv_path, rows, bad_rows)


class ImageProblem(Exception):

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def encoded_rgb_image(path: str) -> tuple[bytes, bool]:
  """(bytes to store, whether they were re-encoded); decodes fully so corrupt files fail at build time.

  JPEG and PNG files already in RGB are stored as they are; anything else (grey, CMYK, palette, other
  formats) is converted to RGB and stored as PNG, so every reader decodes to HxWx3.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageProblem("missing image file") from None
  except OSError as e:
    raise ImageProblem(f"unreadable image file ({e.strerror})") from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in ("JPEG", "PNG") and image.mode == "RGB":
        return data, False
      rgb = image.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for malformed files.
    raise ImageProblem(f"corrupt image ({type(e).__name__}: {e})") from None
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue(), True


def describe(csv_path: str, bad: BadRow) -> str:
  where = f"{csv_path}, line {bad.line} (id {bad.id!r})"
  what = bad.reason if bad.file == csv_path else f"{bad.reason}: {bad.file}"
  return f"{where}: {what}"


def check_on_bad_row(on_bad_row: str) -> str:
  if on_bad_row not in ON_BAD_ROW:
    raise ValueError(f"on_bad_row={on_bad_row!r}; expected one of {', '.join(ON_BAD_ROW)}.")
  return on_bad_row


def fashion_catalog(manual_dir: str, label_field: str) -> Catalog:
  return read_catalog(os.path.join(manual_dir, FASHION_CSV), id_column="id", text_column="title",
                       label_column=label_field, split_column="split", image_column=None,
                       image_dir=os.path.join(manual_dir, "images"))
