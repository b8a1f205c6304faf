r"""A product folder of any size, for scale benchmarks: N products with photos, titles, labels, splits.

  PYTHONPATH=. python scripts/make_catalogue.py --products=200000 --out=/tmp/cat200k
  PYTHONPATH=. python scripts/make_catalogue.py --products=1000 --out=/tmp/toy1k --source=toyshop

Writes OUT/products.csv (id, text, label, split, image) and OUT/images/, the layout
`data.name=product_folder` reads (configs/common.py's `taimd17k` variant: `id`, `text`, `label`,
`split` columns; `--config.data.image_column=image` names the photo, which for the fashion source
is also the default `{id}.jpg`).

`--source=fashion` (the default) re-uses the real fashion catalogue's photos under new ids
(`p0000000`, ...): each photo is a hard link to the source file, so a million products cost a
million directory entries and no photo bytes (across filesystems, or where links are refused, the
photo is copied, and the script says so). Titles and labels come from the source rows, in a seeded
order, cycled as often as N needs; a repeat's title gets an edition word, so no two rows are alike.
The CSV is written as it goes: memory holds the source's rows, never N products' photos.

`--source=toyshop` generates the products (jmmshap.toyshop, PNG photos), for a machine without the
fashion data; its own 70/10/20 split.

Splits of the fashion source: the rows cycle 7 train, 1 validation, 2 test, but a label's first row
is always train, so that every label has a train row (product_folder's class set is the train labels).
"""

from __future__ import annotations

import argparse
import csv
import errno
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator

from jmmshap import errors, toyshop

COLUMNS = ("id", "text", "label", "split", "image")
CSV_NAME = "products.csv"
IMAGE_DIR = "images"
DEFAULT_FASHION = "../shared/data/fashion-products"  # As configs/common.py's fashion variant: from the repo root.
# The split of position i % 10 of the fashion source's rows: 70/10/20.
_SPLIT_CYCLE = ("train",) * 7 + ("validation",) + ("test",) * 2
# Appended to a repeated title (cycle 2, 3, ... of the source rows), then numbered.
_EDITIONS = ("Classic", "New", "Select", "Essential", "Original", "Everyday", "Limited", "Studio")
# Link failures that mean "this filesystem will not link this file here": copy instead.
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)


def edition_title(title: str, cycle: int) -> str:
  """The title of the `cycle`-th repeat of a source row (0: the title itself)."""
  if cycle == 0:
    return title
  word = _EDITIONS[(cycle - 1) % len(_EDITIONS)]
  round_number = (cycle - 1) // len(_EDITIONS)
  return f"{title} {word}" + (f" {round_number + 1}" if round_number else "")


def fashion_rows(source_dir: str, label_field: str, seed: int) -> list[tuple[str, str, str]]:
  """(title, label, photo path) of every source row with a photo, in a seeded order."""
  csv_path = os.path.join(source_dir, CSV_NAME)
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"{csv_path} not found: --fashion_dir must be the fashion-products folder "
                            "(products.csv + images/), or use --source=toyshop.")
  rows = []
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"id", "title", label_field} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{csv_path} has no column(s) {sorted(missing)}; its header is {reader.fieldnames}.")
    for row in reader:
      photo = os.path.join(source_dir, IMAGE_DIR, f"{row['id']}.jpg")
      if row["title"].strip() and row[label_field].strip() and os.path.isfile(photo):
        rows.append((row["title"].strip(), row[label_field].strip(), photo))
  if not rows:
    raise ValueError(f"{csv_path}: no row with a title, a {label_field} and a photo.")
  random.Random(seed).shuffle(rows)
  return rows


class PhotoPlacer:
  """Puts a source photo at a new path: a hard link, or a copy where linking is refused."""

  def __init__(self):
    self.links = self.copies = 0
    self.link_refused: OSError | None = None

  def place(self, source: str, target: str) -> None:
    if self.link_refused is None:
      try:
        os.link(source, target)
        self.links += 1
        return
      except OSError as error:
        if error.errno not in _NO_LINK:
          raise
        self.link_refused = error
        print(f"make_catalogue: cannot hard-link {source} to {target} ({error.strerror}); copying "
              "the photos instead", file=sys.stderr)
    shutil.copyfile(source, target)
    self.copies += 1


def fashion_products(source_dir: str, count: int, label_field: str, seed: int,
                     image_dir: str, placer: PhotoPlacer) -> Iterator[tuple[str, str, str, str, str]]:
  """(id, title, label, split, image name) of `count` products, each photo placed as it is yielded."""
  source = fashion_rows(source_dir, label_field, seed)
  labels_in_train = set()
  for index in range(count):
    cycle, position = divmod(index, len(source))
    title, label, photo = source[position]
    split = _SPLIT_CYCLE[index % len(_SPLIT_CYCLE)]
    if label not in labels_in_train:
      split = "train"
    if split == "train":
      labels_in_train.add(label)
    product_id = f"p{index:07d}"
    image = f"{product_id}.jpg"
    placer.place(photo, os.path.join(image_dir, image))
    yield product_id, edition_title(title, cycle), label, split, image


def split_sizes(count: int) -> dict[str, int]:
  """70/10/20 of `count` products, each split at least one."""
  sizes = {"validation": count // 10, "test": count // 5}
  sizes["train"] = count - sizes["validation"] - sizes["test"]
  if min(sizes.values()) < 1:
    raise ValueError(f"--products={count}: too few for a train, validation and test split (at least 10).")
  return sizes


def toyshop_products(count: int, seed: int, image_dir: str) -> Iterator[tuple[str, str, str, str, str]]:
  """(id, title, label, split, image name) of `count` generated products, each photo written."""
  sizes = split_sizes(count)
  num_classes = toyshop.ToyshopSpec().num_classes
  spec = toyshop.ToyshopSpec(seed=seed, **{f"{split}_per_class": math.ceil(size / num_classes)
                                           for split, size in sizes.items()})
  for split in toyshop.SPLITS:
    for _, example in zip(range(sizes[split]), toyshop.examples(spec, split)):
      image = f"{example['id']}.png"
      with open(os.path.join(image_dir, image), "wb") as f:
        f.write(example["image"])
      yield example["id"], example["title"], example["label"], split, image


def write_catalogue(out: str, count: int, source: str = "fashion", seed: int = 0,
                    fashion_dir: str = DEFAULT_FASHION, label_field: str = "article_type") -> dict:
  """Writes the product folder; returns what was written (counts per split, links, copies, seconds)."""
  if count <= 0:
    raise ValueError(f"--products={count}: expected a positive number of products.")
  if source not in ("fashion", "toyshop"):
    raise ValueError(f"--source={source!r}: expected fashion or toyshop.")
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"{out} is not empty; give a new or empty --out folder.")
  start = time.perf_counter()
  image_dir = os.path.join(out, IMAGE_DIR)
  os.makedirs(image_dir)
  placer = PhotoPlacer()
  products = (fashion_products(fashion_dir, count, label_field, seed, image_dir, placer)
              if source == "fashion" else toyshop_products(count, seed, image_dir))
  splits = dict.fromkeys(toyshop.SPLITS, 0)
  with open(os.path.join(out, CSV_NAME), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for row in products:
      writer.writerow(row)
      splits[row[3]] += 1
  empty = [split for split, n in splits.items() if not n]
  if empty:
    raise ValueError(f"{out}: no {' or '.join(empty)} products among {count} (too few products for "
                     "the labels: every label's first product is train); use more --products.")
  return {"products": count, "source": source, "splits": splits, "links": placer.links,
          "copies": placer.copies, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--products", type=int, required=True, help="How many products to write.")
  parser.add_argument("--out", required=True, help="A new or empty folder.")
  parser.add_argument("--source", default="fashion", choices=("fashion", "toyshop"))
  parser.add_argument("--seed", type=int, default=0, help="Order of the source rows (fashion) or "
                      "generator seed (toyshop).")
  parser.add_argument("--fashion_dir", default=DEFAULT_FASHION, help="The fashion-products folder.")
  parser.add_argument("--label_field", default="article_type", help="The fashion column to label by.")
  args = parser.parse_args(argv)
  written = write_catalogue(args.out, args.products, args.source, args.seed,
                            os.path.abspath(args.fashion_dir), args.label_field)
  how = (f"{written['links']} photos hard-linked, {written['copies']} copied"
         if args.source == "fashion" else "photos generated")
  print(f"wrote {args.products} products to {args.out} ({written['splits']}; {how}) in "
        f"{written['seconds']:.1f} s")


if __name__ == "__main__":
  errors.exit_on_user_error(main)()
