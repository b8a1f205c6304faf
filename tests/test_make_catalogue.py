"""scripts/make_catalogue.py: catalogues of any size for the scale benchmark, read as product folders."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from configs import common
from jmmshap import builders, toyshop
from scripts import make_catalogue

_SOURCE_ROWS = [("11", "Puma Men Grey Tshirt", "Tshirts"), ("12", "Nike Women Blue Shoes", "Shoes"),
                ("13", "Fossil Men Black Watch", "Watches"), ("14", "Levis Men Red Tshirt", "Tshirts"),
                ("15", "Adidas Men White Shoes", "Shoes")]


@pytest.fixture
def fashion_dir(tmp_path):
  """A five-product fashion-products folder: products.csv (its columns) and distinct JPEGs."""
  folder = tmp_path / "fashion"
  (folder / "images").mkdir(parents=True)
  with open(folder / "products.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "title", "article_type", "split"])
    for index, (product_id, title, label) in enumerate(_SOURCE_ROWS):
      writer.writerow([product_id, title, label, "train"])
      pixels = np.full((16, 12, 3), 40 * index, np.uint8)
      Image.fromarray(pixels).save(folder / "images" / f"{product_id}.jpg", format="JPEG")
  return str(folder)


def _read(out):
  with open(os.path.join(out, "products.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_fashion_catalogue_reuses_source_photos_under_distinct_ids_and_prepares(fashion_dir, tmp_path):
  out = str(tmp_path / "catalogue")
  written = make_catalogue.write_catalogue(out, 60, "fashion", fashion_dir=fashion_dir)
  rows = _read(out)
  assert len(rows) == 60 and len({row["id"] for row in rows}) == 60
  assert len({row["text"] for row in rows}) == 60  # Repeats of a source title are told apart.
  source_bytes = {}
  for product_id, title, label in _SOURCE_ROWS:
    with open(os.path.join(fashion_dir, "images", f"{product_id}.jpg"), "rb") as f:
      source_bytes[title] = (f.read(), label)
  for row in rows:
    source_title = next(title for title in source_bytes if row["text"].startswith(title))
    photo, label = source_bytes[source_title]
    with open(os.path.join(out, "images", row["image"]), "rb") as f:
      assert f.read() == photo, row
    assert row["label"] == label
  assert written["links"] + written["copies"] == 60

  data = common.data_config("taimd17k")
  data.update(manual_dir=out, data_dir=str(tmp_path / "tfds"), image_column="image")
  builder = builders.prepare(data)
  assert sorted(builder.info.features["label"].names) == ["Shoes", "Tshirts", "Watches"]
  counts = {split: builder.info.splits[split].num_examples for split in builders.SPLITS}
  assert counts == written["splits"] and sum(counts.values()) == 60


def test_toyshop_catalogue_holds_the_generated_photos(tmp_path):
  out = str(tmp_path / "toy")
  written = make_catalogue.write_catalogue(out, 20, "toyshop", seed=3)
  rows = _read(out)
  assert len({row["id"] for row in rows}) == 20
  assert written["splits"] == {"train": 14, "validation": 2, "test": 4}
  spec = toyshop.ToyshopSpec(seed=3, train_per_class=2, validation_per_class=1, test_per_class=1)
  generated = {example["id"]: example["image"] for split in toyshop.SPLITS
               for example in toyshop.examples(spec, split)}
  for row in rows:
    with open(os.path.join(out, "images", row["image"]), "rb") as f:
      assert f.read() == generated[row["id"]], row


def test_bad_requests_are_refused(fashion_dir, tmp_path):
  with pytest.raises(ValueError, match="positive"):
    make_catalogue.write_catalogue(str(tmp_path / "a"), 0, fashion_dir=fashion_dir)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(FileExistsError, match="not empty"):
    make_catalogue.write_catalogue(str(tmp_path / "full"), 20, fashion_dir=fashion_dir)
  with pytest.raises(FileNotFoundError, match="products.csv"):
    make_catalogue.write_catalogue(str(tmp_path / "b"), 20, fashion_dir=str(tmp_path / "nowhere"))
