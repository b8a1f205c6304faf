"""catalog.read_products: new products to classify are read and checked as a training catalogue is,
with labels only when the CSV has a label column."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from jmmshap import catalog


def _folder(tmp_path, header, rows):
  images = tmp_path / "images"
  images.mkdir()
  for name in ("a", "b", "c"):
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(images / f"{name}.jpg")
  with open(tmp_path / "new.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(tmp_path / "new.csv"), str(images)


def _read(path, images, **columns):
  return catalog.read_products(path, id_column=columns.get("id", "id"), text_column="title",
                               image_column=None, image_dir=images, label_column="label")


def test_products_without_a_label_column_are_read_without_labels(tmp_path):
  path, images = _folder(tmp_path, ["id", "title"], [["a", "Desk lamp"], ["b", " "], ["a", "Mug"],
                                                     ["c", "Cap"]])
  products = _read(path, images)
  assert not products.labelled
  assert [(row.id, row.title, row.label, row.split) for row in products.rows] == [
      ("a", "Desk lamp", None, None), ("c", "Cap", None, None)]
  assert products.rows[1].image_path == os.path.join(os.path.realpath(images), "c.jpg")
  assert [(bad.line, bad.id, bad.reason) for bad in products.bad_rows] == [
      (3, "b", "empty title in column 'title'"), (4, "a", "duplicate id 'a' (first on line 2)")]


def test_products_with_a_label_column_are_read_with_labels_and_an_empty_one_is_a_bad_row(tmp_path):
  path, images = _folder(tmp_path, ["label", "title", "id"], [["lamp", "Desk lamp", "a"],
                                                              ["", "Mug", "b"]])
  products = _read(path, images)
  assert products.labelled and [row.label for row in products.rows] == ["lamp"]
  assert [(bad.line, bad.reason) for bad in products.bad_rows] == [
      (3, "empty label in column 'label'")]


def test_an_unknown_id_column_names_the_columns_the_file_has(tmp_path):
  path, images = _folder(tmp_path, ["id", "title"], [["a", "Desk lamp"]])
  with pytest.raises(catalog.CsvFormatError, match=r"no column\(s\) 'sku'; the header has 'id', "
                                                   r"'title'"):
    _read(path, images, id="sku")


def test_a_training_catalogue_still_needs_its_label_column(tmp_path):
  path, images = _folder(tmp_path, ["id", "title"], [["a", "Desk lamp"]])
  with pytest.raises(catalog.CsvFormatError, match=r"no column\(s\) 'label'"):
    catalog.read_catalog(path, id_column="id", text_column="title", label_column="label",
                         split_column=None, image_column=None, image_dir=images)
