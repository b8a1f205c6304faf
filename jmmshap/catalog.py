"""Reading a product CSV and its images: every row checked, the bad ones set apart with a reason.

Shared by the CSV builders (`builders.FashionProducts`, `builders.ProductFolder`), by the predictor
(`read_products`: new products, labels optional) and by anything else that reads a catalogue the way
they do (scripts/baselines.py). A row is bad when it cannot be an example whatever the images hold
(wrong field count, bytes that are not UTF-8, unknown split, empty or duplicate id, empty title or
label) or when its image is missing, unreadable or corrupt. Bad rows are reported with their CSV
line; what happens to them (stop or skip) is the `on_bad_row` policy of the caller.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import itertools
import operator
import os
import re
import sys
import unicodedata
from collections.abc import Sequence

from absl import logging
from PIL import Image

from jmmshap import errors, photo_hashes

SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")  # What the learners are evaluated and stacked on.
ON_BAD_ROW = ("error", "skip")
UNASSIGNED = "unassigned"  # Report key for bad rows whose split is unknown (e.g. its split value is bad).
FASHION_CSV = "products.csv"
_PHOTOS_PER_LOOKUP = 16384  # Photos whose digests are looked up (or hashed) at once.


class BadRowError(ValueError, errors.UserError):
  """A CSV row that cannot become an example, with on_bad_row='error'."""


class CsvFormatError(ValueError, errors.UserError):
  """A CSV that cannot be read at all (missing column, undecodable header, ...): no skip possible."""


@dataclasses.dataclass(frozen=True)
class BadRow:
  """One skipped row, as listed in bad_rows.json."""
  split: str
  line: int
  id: str
  file: str
  reason: str


@dataclasses.dataclass(frozen=True, slots=True)  # Slots: a million rows in a third of the memory.
class Row:
  line: int
  id: str
  title: str
  label: str | None  # None: a catalogue read without labels (`read_products` of an unlabelled CSV).
  split: str | None
  image_path: str


@dataclasses.dataclass
class Catalog:
  csv_path: str
  rows: list[Row]
  bad_rows: list[BadRow]
  labelled: bool = True  # Whether the rows carry labels.


def _printable(text: str) -> str:
  """Text with undecodable bytes (kept as surrogates) shown as U+FFFD, safe to print and to JSON."""
  return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _first_bad_byte(text: str) -> str:
  for char in text:
    if "\udc80" <= char <= "\udcff":
      return f"0x{ord(char) - 0xdc00:02x}"
  return "?"


def is_blank(text: str) -> bool:
  """Nothing visible: only whitespace and format characters (zero-width spaces and joiners)."""
  visible = text.strip()
  if visible and unicodedata.category(visible[0]) != "Cf":
    return False  # The common case, at the cost of one character's look-up.
  return all(char.isspace() or unicodedata.category(char) == "Cf" for char in visible)


def _symlinks(root: str) -> set[str]:
  """The names of the symlinks in folder `root`, from one listing (no `lstat` per row)."""
  try:
    with os.scandir(root) as entries:
      return {entry.name for entry in entries if entry.is_symlink()}
  except OSError:
    return set()


def contained(root: str, name: str, symlinks: set[str] | None = None) -> str | None:
  """The image's path when it lies inside the image folder `root` (a `realpath`), else None.

  An id or image column of a catalogue made elsewhere may hold `../../x`, an absolute path, or name
  a symlink that points out of the folder; none of those may be read into a dataset. The answer
  does not depend on whether such an outside file exists. A plain file name costs one `lstat`, or
  nothing given `symlinks` (`_symlinks(root)`, for a whole catalogue); a name with folders, or a
  symlink, is resolved in full.
  """
  inside = root.rstrip(os.sep) + os.sep
  if name and os.sep not in name and name not in (".", ".."):  # A plain file name: the fast path.
    path = inside + name
    link = os.path.islink(path) if symlinks is None else name in symlinks
    return path if not link or _inside(os.path.realpath(path), inside) else None
  path = os.path.normpath(os.path.join(root, name))
  if os.path.dirname(path) != root or os.path.islink(path):
    path = os.path.realpath(path)
  return path if _inside(path, inside) else None


def _inside(path: str, inside: str) -> bool:
  return path.startswith(inside) and len(path) > len(inside)


def _fields_of(line: str) -> list[str]:
  """The fields of one physical line read on its own, as far as they can be read (a field over the
  csv module's size limit included, for the id and split of its row)."""
  limit = csv.field_size_limit()
  csv.field_size_limit(max(limit, len(line) + 1))
  try:
    return next(csv.reader([line]), [])
  except csv.Error:
    return []
  finally:
    csv.field_size_limit(limit)


def _records(lines: list[str], start: int):
  """(line number, fields, problem) for every record of `lines[start:]`; with a problem, the
  fields are those of that line alone, as far as they can be read (for its id).

  A record must end on the line it starts on. A quoted field left open (an unmatched quote, such as
  `5"` for inches at the start of a field) would otherwise swallow every line up to the next quote
  into one field: that line is reported, and the lines after it are read again as rows of their
  own. A field over the csv module's size limit is reported the same way.
  """
  position = start
  while position < len(lines):
    reader = csv.reader(itertools.islice(lines, position, None))  # line_num: the lines it took.
    while True:
      first = position + reader.line_num
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as error:
        yield first + 1, _fields_of(lines[first]), (
            f"unreadable CSV field ({error}); shorten or fix the field")
        break
      taken = position + reader.line_num - first
      if taken > 1:
        yield first + 1, _fields_of(lines[first]), (
            f"a quoted field that opens on this line is not closed on it and runs over {taken} "
            f"lines (to line {first + taken}): an unmatched quote (e.g. 5\" for inches)? Double it "
            "(\"\") or quote the whole field")
        break
      yield first + 1, fields, None
    position = first + 1  # Read again from the line after the bad one, with a fresh reader.


def read_catalog(csv_path: str, *, id_column: str, text_column: str, label_column: str | None,
                 split_column: str | None, image_column: str | None, image_dir: str,
                 label_optional: bool = False) -> Catalog:
  """Parses every row, setting apart the ones that cannot be an example whatever the images hold.

  label_column None reads no labels; with `label_optional` a header without `label_column` reads
  none either (new products to classify), and one with it reads them as a training catalogue does.
  """
  if not os.path.isfile(csv_path):
    raise CsvFormatError(f"{csv_path}: no such CSV file. Point the data config at the product CSV.")
  with open(csv_path, "rb") as f:
    raw = f.read()
  # surrogateescape keeps undecodable bytes, so one bad row is reported instead of the whole file.
  text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
  all_utf8 = _printable(text) == text  # Then no field needs the check.
  lines = io.StringIO(text, newline="").readlines()
  del raw, text  # The lines are what is read from here on: a catalogue's text is held once.
  records = _records(lines, 0)
  _, header, problem = next(records, (1, None, None))
  if problem is not None:
    raise CsvFormatError(f"{csv_path}, line 1: the header cannot be read ({problem}).")
  if not header:
    raise CsvFormatError(f"{csv_path}: the file is empty; expected a header row and product rows.")
  if any(_printable(name) != name for name in header):
    raise CsvFormatError(f"{csv_path}, line 1: the header is not valid UTF-8; re-save the file as UTF-8.")
  header = [name.strip() for name in header]
  if label_optional and label_column not in header:
    label_column = None
  wanted = {"id": id_column, "text": text_column}
  if label_column:
    wanted["label"] = label_column
  if split_column:
    wanted["split"] = split_column
  if image_column:
    wanted["image"] = image_column
  missing = sorted(column for column in wanted.values() if column not in header)
  if missing:
    hint = (" Without a split column, set the data config's split_column to '' for a seeded "
            "stratified 70/10/20 split." if split_column in missing else "")
    raise CsvFormatError(
        f"{csv_path}: no column(s) {', '.join(map(repr, missing))}; the header has "
        f"{', '.join(map(repr, header))}. Set the data config's column names to match the file."
        + hint)
  index = {role: header.index(column) for role, column in wanted.items()}
  roles, fields_of = tuple(index), operator.itemgetter(*index.values())

  image_root = os.path.realpath(image_dir)
  symlinks = _symlinks(image_root)
  rows, bad_rows, first_line_of_id = [], [], {}
  for line, record, problem in records:
    if problem is None and not record:
      continue  # A blank line holds no product.
    if len(record) == len(header):
      values = dict(zip(roles, map(str.strip, fields_of(record))))
    else:
      values = {role: record[i].strip() if i < len(record) else "" for role, i in index.items()}
    split = values["split"].lower() if split_column else None
    undecodable = [] if all_utf8 else [name for name, value in zip(header, record)
                                       if _printable(value) != value]
    image_path = None
    if problem is not None:
      reason = problem
    elif len(record) != len(header):
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
    elif is_blank(values["text"]):
      reason = f"empty title in column {text_column!r}"
    elif label_column and is_blank(values["label"]):
      reason = f"empty label in column {label_column!r}"
    elif image_column and not values["image"]:
      reason = f"empty image path in column {image_column!r}"
    else:
      name = values["image"] if image_column else f"{values['id']}.jpg"
      image_path = contained(image_root, name, symlinks)
      reason = (None if image_path is not None else
                f"image path {name!r} leads outside the image folder {image_dir}")
    if reason is not None:
      bad_rows.append(BadRow(split if split in SPLITS else UNASSIGNED, line,
                             _printable(values["id"]), csv_path, reason))
      continue
    first_line_of_id[values["id"]] = line
    label = values.get("label")
    rows.append(Row(line, values["id"], values["text"], label and sys.intern(label),
                    split and sys.intern(split), image_path))
  if label_column:
    _warn_about_labels_differing_in_case(csv_path, rows)
  return Catalog(csv_path, rows, bad_rows, labelled=bool(label_column))


def read_products(csv_path: str, *, id_column: str, text_column: str, image_column: str | None,
                  image_dir: str, label_column: str | None = None) -> Catalog:
  """New products to classify: id, title and image of every row, checked as a training catalogue's
  rows are (containment included); labels only where the header has `label_column`."""
  return read_catalog(csv_path, id_column=id_column, text_column=text_column,
                      label_column=label_column, split_column=None, image_column=image_column,
                      image_dir=image_dir, label_optional=True)


def _warn_about_labels_differing_in_case(csv_path: str, rows: list[Row]) -> None:
  """'Shirts' and 'shirts' are two classes to the builders; that is rarely what a catalogue means."""
  spellings = collections.defaultdict(set)
  for row in rows:
    spellings[row.label.casefold()].add(row.label)
  clashes = [sorted(names) for names in spellings.values() if len(names) > 1]
  if clashes:
    logging.warning("%s: labels that differ only in case are distinct classes: %s. Make their "
                    "spelling the same if they are one class.", csv_path,
                    "; ".join(" / ".join(names) for names in sorted(clashes)))


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
  return encoded_rgb_bytes(data)


def checked_photos(paths: Sequence[str]) -> list[tuple[bytes | None, str | None]]:
  """(bytes to store, None) or (None, what is wrong) for each photo: the work of a preparation
  worker process, batched to amortise the round trip."""
  checked = []
  for path in paths:
    try:
      checked.append((encoded_rgb_image(path)[0], None))
    except ImageProblem as problem:
      checked.append((None, problem.reason))
  return checked


def encoded_rgb_bytes(data: bytes) -> tuple[bytes, bool]:
  """`encoded_rgb_image` of a file's bytes already read (an image handed over in memory)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      kept = image.format in ("JPEG", "PNG") and image.mode == "RGB"
      if kept and image.format == "JPEG":
        # Every entropy-coded byte is still decoded (a truncated or corrupt file still fails), at
        # the smallest DCT scale: 1.5x faster on the fashion photos.
        image.draft("RGB", (1, 1))
      image.load()
      if kept:
        return data, False
      rgb = image.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for malformed files.
    # PIL names the in-memory file by its address; the report names the file instead.
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    raise ImageProblem(f"corrupt image ({type(e).__name__}: {message})") from None
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue(), True


def images_fingerprint(image_dir: str, rows: list[Row], cache_path: str | None = None) -> str:
  """A digest of the bytes of the rows' image files (missing ones too), so that a prepared dataset
  is rebuilt when a photo is replaced or restored, and is still reused when the catalogue is only
  copied or re-mounted (new modification times, same bytes).

  With `cache_path`, a photo unchanged since it was last hashed costs one `stat`
  (`photo_hashes`); without, every byte is read (0.8 s for the 63 MB fashion catalogue).
  """
  inside = os.path.realpath(image_dir).rstrip(os.sep) + os.sep
  paths = sorted(row.image_path for row in rows)
  digest = hashlib.sha256()
  for start in range(0, len(paths), _PHOTOS_PER_LOOKUP):  # Blocks: memory bounded at any size.
    block = paths[start:start + _PHOTOS_PER_LOOKUP]
    for path, photo_digest in zip(block, photo_hashes.digests(block, cache_path)):
      name = path[len(inside):] if path.startswith(inside) else os.path.relpath(path, inside)
      digest.update(f"{name}\t{photo_digest}\n".encode("utf-8", "surrogateescape"))
  return digest.hexdigest()


def describe(csv_path: str, bad: BadRow) -> str:
  where = f"{csv_path}, line {bad.line} (id {bad.id!r})"
  what = bad.reason if bad.file == csv_path else f"{bad.reason}: {bad.file}"
  return f"{where}: {what}"


def check_on_bad_row(on_bad_row: str) -> str:
  if on_bad_row not in ON_BAD_ROW:
    raise ValueError(f"on_bad_row={on_bad_row!r}; expected one of {', '.join(ON_BAD_ROW)}.")
  return on_bad_row


def fashion_image_dir(manual_dir: str) -> str:
  return os.path.join(manual_dir, "images")


def fashion_catalog(manual_dir: str, label_field: str) -> Catalog:
  return read_catalog(os.path.join(manual_dir, FASHION_CSV), id_column="id", text_column="title",
                      label_column=label_field, split_column="split", image_column=None,
                      image_dir=fashion_image_dir(manual_dir))
