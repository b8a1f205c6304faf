"""Builders: round trips through array_record + as_data_source, class selection, splits, bad rows."""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import ml_collections
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from jmmshap import builders, photo_hashes, preparation, toyshop

# The shared catalogue lies beside the repository (../shared), in CI as here.
FASHION_DIR = os.environ.get("JMMSHAP_FASHION_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "fashion-products"))
SKIP_HINT = "--config.data.on_bad_row=skip"

tfds.disable_progress_bar()


def _read_all(builder, split: str) -> dict[str, dict]:
  """Every example of a split by id, text fields decoded."""
  source = builder.as_data_source(split)
  examples = {}
  for index in range(len(source)):
    example = source[index]
    example_id = example["id"].decode()
    examples[example_id] = dict(example, id=example_id, title=example["title"].decode())
  return examples


# ---------------------------------------------------------------------------------------------------
# Toyshop.

_TOY = dict(train_per_class=2, validation_per_class=1, test_per_class=1)


def _toyshop_config(data_dir, **spec_overrides):
  return ml_collections.ConfigDict(
      dict(name="toyshop", data_dir=str(data_dir), toyshop=dict(_TOY, **spec_overrides)))


def test_toyshop_round_trips_through_data_source(tmp_path):
  builder = builders.prepare(_toyshop_config(tmp_path))
  spec = toyshop.ToyshopSpec(**_TOY)
  names = builder.info.features["label"].names
  assert names == [c.name for c in toyshop.classes(spec)]
  for split in builders.SPLITS:
    stored = _read_all(builder, split)
    expected = list(toyshop.examples(spec, split))
    assert sorted(stored) == sorted(e["id"] for e in expected)
    for example in expected:
      got = stored[example["id"]]
      assert got["title"] == example["title"]
      assert names[got["label"]] == example["label"]
      assert got["image"].dtype == np.uint8 and got["image"].shape == (32, 32, 3)
      np.testing.assert_array_equal(got["image"], np.asarray(Image.open(io.BytesIO(example["image"]))))


def test_preparing_a_dataset_leaves_no_temporary_folder_behind(tmp_path, monkeypatch):
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  builders.prepare(_toyshop_config(tmp_path / "data"))
  assert not list(scratch.iterdir())


def test_toyshop_class_reliance_is_stored_with_the_prepared_data(tmp_path):
  builder = builders.prepare(_toyshop_config(tmp_path))
  expected = [dict(name=c.name, reliance=c.reliance, text_share=c.text_share)
              for c in toyshop.classes(toyshop.ToyshopSpec(**_TOY))]
  assert builders.class_reliance(builder) == expected
  # A reader without the builder class gets it from the files alone.
  assert builders.class_reliance(tfds.builder_from_directory(builder.data_dir)) == expected


def test_toyshop_settings_get_separate_caches_and_same_settings_reuse_one(tmp_path):
  first = builders.prepare(_toyshop_config(tmp_path))
  stamp = os.path.getmtime(os.path.join(first.data_dir, "dataset_info.json"))
  again = builders.prepare(_toyshop_config(tmp_path))
  assert again.data_dir == first.data_dir
  assert os.path.getmtime(os.path.join(first.data_dir, "dataset_info.json")) == stamp
  reseeded = builders.builder_for(_toyshop_config(tmp_path, seed=1))
  assert reseeded.data_dir != first.data_dir
  assert str(tmp_path) in first.data_dir


def test_toyshop_unknown_spec_key_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="data.toyshop has unknown key.*image_px"):
    builders.prepare(_toyshop_config(tmp_path, image_px=32))


def test_unknown_dataset_name_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="data.name='imagenet'"):
    builders.prepare(ml_collections.ConfigDict(dict(name="imagenet", data_dir=str(tmp_path))))


# ---------------------------------------------------------------------------------------------------
# FashionProducts, on a 200-row sample of the real data.

_FASHION_SAMPLE_ROWS = 200


@pytest.fixture(scope="module")
def fashion_sample(tmp_path_factory) -> str:
  """products.csv's first 200 rows and their images; it holds all three splits."""
  if not os.path.isfile(os.path.join(FASHION_DIR, "products.csv")):
    pytest.skip(f"no fashion-products data at {FASHION_DIR}; set JMMSHAP_FASHION_DIR to run these.")
  root = tmp_path_factory.mktemp("fashion")
  os.makedirs(root / "images")
  with open(os.path.join(FASHION_DIR, "products.csv"), newline="", encoding="utf-8") as f:
    lines = f.readlines()[:_FASHION_SAMPLE_ROWS + 1]
  (root / "products.csv").write_text("".join(lines), encoding="utf-8")
  for row in csv.DictReader(lines):
    shutil.copy(os.path.join(FASHION_DIR, "images", f"{row['id']}.jpg"), root / "images")
  return str(root)


def _fashion_rows(manual_dir: str) -> list[dict]:
  with open(os.path.join(manual_dir, "products.csv"), newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _fashion_config(manual_dir, data_dir, **overrides):
  return ml_collections.ConfigDict(dict(name="fashion_products", manual_dir=str(manual_dir),
                                        data_dir=str(data_dir), **overrides))


def _copy_folder(source: str, target) -> str:
  shutil.copytree(source, target)
  return str(target)


def test_fashion_selects_top_k_classes_and_honours_the_split_column(fashion_sample, tmp_path):
  builder = builders.prepare(_fashion_config(fashion_sample, tmp_path, top_k=5))
  rows = _fashion_rows(fashion_sample)
  counts = collections.Counter(row["article_type"] for row in rows)
  expected_classes = sorted(counts, key=lambda name: (-counts[name], name))[:5]
  assert builder.info.features["label"].names == expected_classes

  report = builders.read_report(builder)
  for split in builders.SPLITS:
    expected = {row["id"]: row for row in rows
                if row["split"] == split and row["article_type"] in expected_classes}
    stored = _read_all(builder, split)
    assert sorted(stored) == sorted(expected)
    for product_id, example in stored.items():
      assert example["title"] == expected[product_id]["title"]
      assert expected_classes[example["label"]] == expected[product_id]["article_type"]
      assert example["image"].ndim == 3 and example["image"].shape[2] == 3
    excluded = sum(1 for row in rows
                   if row["split"] == split and row["article_type"] not in expected_classes)
    assert report["excluded_by_selection"][split] == excluded
    assert report["skipped"][split] == 0
  assert builders.class_reliance(builder) is None  # Real data has no designed reliance.


def test_fashion_min_count_selects_by_frequency_on_another_label_field(fashion_sample, tmp_path):
  builder = builders.prepare(_fashion_config(fashion_sample, tmp_path, label_field="sub_category",
                                             top_k=None, min_count=10))
  counts = collections.Counter(row["sub_category"] for row in _fashion_rows(fashion_sample))
  expected = sorted((name for name, n in counts.items() if n >= 10), key=lambda n: (-counts[n], n))
  assert builder.info.features["label"].names == expected
  assert sum(builder.info.splits[s].num_examples for s in builders.SPLITS) == sum(
      counts[name] for name in expected)


def test_select_classes_breaks_ties_by_name():
  counts = {"b": 3, "a": 3, "c": 5, "d": 1}
  assert builders.select_classes(counts, top_k=2, min_count=None) == ["c", "a"]
  assert builders.select_classes(counts, top_k=None, min_count=3) == ["c", "a", "b"]
  assert builders.select_classes(counts, top_k=2, min_count=4) == ["c"]


def test_fashion_settings_and_csv_content_name_the_cache(fashion_sample, tmp_path):
  def name(**settings):
    return builders.fashion_products_config(fashion_sample, **settings).name

  names = {name(top_k=5), name(top_k=6), name(top_k=5, on_bad_row="skip"),
           name(top_k=5, label_field="sub_category"), name(top_k=None, min_count=5)}
  assert len(names) == 5
  assert name(top_k=5, min_count=0) == name(top_k=5)  # No minimum either way: one cache.
  edited = _copy_folder(fashion_sample, tmp_path / "edited")
  with open(os.path.join(edited, "products.csv"), "a", encoding="utf-8") as f:
    f.write("\n")
  assert builders.fashion_products_config(edited, top_k=5).name != name(top_k=5)


def test_fashion_without_manual_dir_is_an_error(tmp_path):
  with pytest.raises(builders.CsvFormatError, match="--config.data.manual_dir"):
    builders.prepare(_fashion_config(tmp_path / "nowhere", tmp_path))


def test_fashion_unknown_label_field_names_the_columns(fashion_sample, tmp_path):
  with pytest.raises(builders.CsvFormatError, match="no column.*'colour'.*'article_type'"):
    builders.prepare(_fashion_config(fashion_sample, tmp_path, label_field="colour"))


# ---------------------------------------------------------------------------------------------------
# ProductFolder, on files written here.

_COLOURS = {"cat": (200, 30, 30), "dog": (30, 30, 200), "fish": (30, 200, 30)}


def _jpeg(colour, size=(8, 6)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, colour).save(buffer, format="JPEG")
  return buffer.getvalue()


def _base_rows(with_split: bool = True) -> list[dict]:
  """Per label (cat, dog): 4 train, 1 validation, 1 test (or no split column)."""
  rows = []
  for label in ("cat", "dog"):
    for index, split in enumerate(["train"] * 4 + ["validation", "test"]):
      row = {"id": f"{label}{index}", "text": f"a {label} toy number {index}", "label": label}
      if with_split:
        row["split"] = split
      rows.append(row)
  return rows


def _write_folder(root, rows: list[dict], *, encoding_errors: dict[str, bytes] | None = None) -> str:
  """CSV + images/{id}.jpg; `encoding_errors` replaces a row's text by raw (non-UTF-8) bytes."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  columns = list(rows[0])
  lines = [",".join(columns).encode()]
  for row in rows:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([row[c] for c in columns])
    line = buffer.getvalue().encode("utf-8")
    if encoding_errors and row["id"] in encoding_errors:
      line = line.replace(row["text"].encode(), encoding_errors[row["id"]])
    lines.append(line)
    with open(os.path.join(root, "images", f"{row['id']}.jpg"), "wb") as f:
      f.write(_jpeg(_COLOURS.get(row["label"], (90, 90, 90))))
  with open(os.path.join(root, "products.csv"), "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return str(root)


def _folder_config(manual_dir, data_dir, **overrides):
  return ml_collections.ConfigDict(dict(name="product_folder", manual_dir=str(manual_dir),
                                        data_dir=str(data_dir), **overrides))


def test_product_folder_with_split_column_round_trips(tmp_path):
  rows = _base_rows()
  folder = _write_folder(tmp_path / "shop", rows)
  builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))
  names = builder.info.features["label"].names
  assert names == ["cat", "dog"]
  for split in builders.SPLITS:
    stored = _read_all(builder, split)
    expected = {row["id"]: row for row in rows if row["split"] == split}
    assert sorted(stored) == sorted(expected)
    for product_id, example in stored.items():
      assert example["title"] == expected[product_id]["text"]
      assert names[example["label"]] == expected[product_id]["label"]
      assert example["image"].shape == (6, 8, 3)
      assert abs(int(example["image"][..., 0].mean()) - _COLOURS[names[example["label"]]][0]) < 8


def test_product_folder_without_split_column_splits_70_10_20_per_label(tmp_path):
  rows = [{"id": f"{label}{i}", "text": f"{label} item {i}", "label": label}
          for label in ("cat", "dog") for i in range(10)]
  folder = _write_folder(tmp_path / "shop", rows)
  builder = builders.prepare(_folder_config(folder, tmp_path / "data"))
  splits = {split: _read_all(builder, split) for split in builders.SPLITS}
  for label_index in (0, 1):
    counts = [sum(e["label"] == label_index for e in splits[s].values()) for s in builders.SPLITS]
    assert counts == [7, 1, 2]
  # Deterministic: a second build elsewhere splits identically; another seed splits differently.
  again = builders.prepare(_folder_config(folder, tmp_path / "again"))
  assert all(sorted(_read_all(again, s)) == sorted(splits[s]) for s in builders.SPLITS)
  reseeded = builders.prepare(_folder_config(folder, tmp_path / "reseeded", split_seed=1))
  assert sorted(_read_all(reseeded, "train")) != sorted(splits["train"])


def test_product_folder_custom_columns_image_column_and_explicit_classes(tmp_path):
  folder = tmp_path / "shop"
  os.makedirs(folder / "pictures")
  rows = []
  for label in ("cat", "dog"):
    for index, split in enumerate(["train", "train", "validation", "test"]):
      product_id = f"{label}{index}"
      Image.new("L", (5, 5), 128).save(folder / "pictures" / f"p_{product_id}.png")  # Grey PNG.
      rows.append([product_id, f"{label} {index}", label, split, f"p_{product_id}.png"])
  with open(folder / "catalogue.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["sku", "name", "category", "part", "picture"])
    writer.writerows(rows)
  builder = builders.prepare(_folder_config(
      folder, tmp_path / "data", csv="catalogue.csv", image_dir="pictures", id_column="sku",
      text_column="name", label_column="category", split_column="part", image_column="picture",
      classes=["dog", "cat", "bird"]))
  assert builder.info.features["label"].names == ["dog", "cat", "bird"]
  train = _read_all(builder, "train")
  assert sorted(train) == ["cat0", "cat1", "dog0", "dog1"]
  assert train["cat0"]["label"] == 1 and train["cat0"]["title"] == "cat 0"
  assert train["cat0"]["image"].shape == (5, 5, 3)  # Grey stored as RGB.


def test_product_folder_split_without_rows_is_an_error(tmp_path):
  rows = [row for row in _base_rows() if row["split"] != "validation"]
  folder = _write_folder(tmp_path / "shop", rows)
  with pytest.raises(ValueError, match="split 'validation' has no usable rows"):
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))


def test_csv_edited_after_the_config_was_made_is_an_error(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  config = builders.product_folder_config(folder, split_column="split")
  with open(os.path.join(folder, "products.csv"), "a", encoding="utf-8") as f:
    f.write("cat9,late addition,cat,train\n")
  builder = builders.ProductFolder(config=config, data_dir=str(tmp_path / "data"),
                                   file_format="array_record")
  with pytest.raises(ValueError, match="products.csv changed since this builder config was made"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))


def test_product_folder_missing_column_is_an_error(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  with pytest.raises(builders.CsvFormatError, match="no column.*'title'.*header has 'id', 'text'"):
    builders.prepare(_folder_config(folder, tmp_path / "data", text_column="title"))


def test_a_csv_without_the_split_column_says_how_to_get_the_stratified_split(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows(with_split=False))
  with pytest.raises(builders.CsvFormatError, match="no column.*'split'.*split_column to '' for a "
                                                    "seeded stratified 70/10/20 split"):
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))


# ---------------------------------------------------------------------------------------------------
# Bad rows, in both modes. Each case breaks the row of id `dog4` (line 12, validation) or `cat1`
# (line 3, train) of `_base_rows()`, and says what the error and the report must name.


def _remove_image(folder):
  os.remove(os.path.join(folder, "images", "dog4.jpg"))


def _write_garbage_image(folder):
  with open(os.path.join(folder, "images", "dog4.jpg"), "wb") as f:
    f.write(b"this is not a jpeg")


def _truncate_image(folder):
  data = _jpeg((1, 2, 3), size=(32, 32))
  with open(os.path.join(folder, "images", "dog4.jpg"), "wb") as f:
    f.write(data[:len(data) // 2])


def _link_image_outside(folder):
  """images/dog4.jpg becomes a symlink to a real photo beside (outside) the image folder."""
  outside = os.path.join(folder, "outside.jpg")
  with open(outside, "wb") as f:
    f.write(_jpeg((1, 2, 3)))
  os.remove(os.path.join(folder, "images", "dog4.jpg"))
  os.symlink(outside, os.path.join(folder, "images", "dog4.jpg"))


@dataclasses.dataclass(frozen=True)
class _BadCase:
  bad_id: str
  reason: str
  file: str  # Relative to the folder: the CSV, or the image the error must name.
  row_edits: dict = dataclasses.field(default_factory=dict)
  folder_edit: Callable[[str], None] | None = None
  raw_text: bytes | None = None  # Replaces the bad row's text with these (non-UTF-8) bytes.
  extra: dict = dataclasses.field(default_factory=dict)
  split_unreadable: bool = False  # The bad line's split field cannot be read: reported unassigned.

  @property
  def line(self) -> int:
    return {"cat1": 3, "dog4": 12}[self.bad_id]

  @property
  def split(self) -> str:
    return {"cat1": "train", "dog4": "validation"}[self.bad_id]

  @property
  def report_split(self) -> str:
    return builders.UNASSIGNED if self.split_unreadable else self.split

  def make(self, root) -> str:
    rows = [dict(row, **self.row_edits.get(row["id"], {})) for row in _base_rows()]
    folder = _write_folder(root, rows, encoding_errors=self.raw_text and {self.bad_id: self.raw_text})
    if self.folder_edit:
      self.folder_edit(folder)
    return folder


_IMAGE = os.path.join("images", "dog4.jpg")
_BAD_CASES = [
    pytest.param(_BadCase("dog4", "missing image file", _IMAGE, folder_edit=_remove_image),
                 id="missing_image"),
    pytest.param(_BadCase("dog4", "corrupt image", _IMAGE, folder_edit=_write_garbage_image),
                 id="garbage_jpeg"),
    pytest.param(_BadCase("dog4", "corrupt image", _IMAGE, folder_edit=_truncate_image),
                 id="truncated_jpeg"),
    pytest.param(_BadCase("cat1", "empty title", "products.csv", row_edits={"cat1": {"text": "   "}}),
                 id="whitespace_title"),
    pytest.param(_BadCase("cat1", "'bird' is not in the configured classes", "products.csv",
                          row_edits={"cat1": {"label": "bird"}}, extra={"classes": ["cat", "dog"]}),
                 id="label_not_in_classes"),
    pytest.param(_BadCase("dog4", "'bird' does not occur in the train split", "products.csv",
                          row_edits={"dog4": {"label": "bird"}}),
                 id="label_unseen_in_train"),
    pytest.param(_BadCase("cat1", "not valid UTF-8 (byte 0xe9", "products.csv",
                          raw_text="Caf\xe9 cat".encode("latin-1")),
                 id="not_utf8"),
    pytest.param(_BadCase("cat1", "empty title", "products.csv",
                          row_edits={"cat1": {"text": "\u200b \u200d\ufeff"}}),
                 id="zero_width_title"),
    pytest.param(_BadCase("dog4", "image path 'dog4.jpg' leads outside the image folder",
                          "products.csv", folder_edit=_link_image_outside),
                 id="symlink_out_of_the_image_folder"),
    # A field that opens with a quote it never closes: without the check it swallows every line
    # after it (there is no other quote in the file) and the rows below it are lost.
    pytest.param(_BadCase("cat1", "unmatched quote", "products.csv", raw_text=b'"5 inch cat',
                          split_unreadable=True),
                 id="unmatched_quote"),
    pytest.param(_BadCase("cat1", "field larger than field limit", "products.csv",
                          raw_text=b"x" * 200_000),
                 id="field_over_the_csv_limit"),
]


@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_row_is_an_error_naming_line_file_and_fix(tmp_path, case):
  folder = case.make(tmp_path / "shop")
  with pytest.raises(builders.BadRowError) as error:
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split", **case.extra))
  message = str(error.value)
  assert f"products.csv, line {case.line} (id '{case.bad_id}')" in message
  assert case.reason in message
  assert os.path.join(folder, case.file) in message
  assert "fix or remove the row" in message.lower() and SKIP_HINT in message


@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_row_is_skipped_counted_logged_and_reported(tmp_path, caplog, case):
  folder = case.make(tmp_path / "shop")
  with caplog.at_level(logging.WARNING):
    builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split",
                                              on_bad_row="skip", **case.extra))
  stored = {split: _read_all(builder, split) for split in builders.SPLITS}
  assert case.bad_id not in stored[case.split]
  assert sum(map(len, stored.values())) == len(_base_rows()) - 1

  report = builders.read_report(builder)
  assert report["on_bad_row"] == "skip"
  assert report["skipped"] == {s: int(s == case.report_split)
                               for s in (*builders.SPLITS, builders.UNASSIGNED)}
  (entry,) = report["bad_rows"][case.report_split]
  assert entry["line"] == case.line and entry["id"] == case.bad_id
  assert case.reason in entry["reason"] and entry["file"] == os.path.join(folder, case.file)
  assert report["examples"] == {split: len(stored[split]) for split in builders.SPLITS}
  assert any(f"line {case.line} (id '{case.bad_id}')" in record.getMessage()
             for record in caplog.records)


def test_fashion_bad_rows_follow_the_same_policy(fashion_sample, tmp_path):
  folder = _copy_folder(fashion_sample, tmp_path / "fashion")
  rows = _fashion_rows(folder)
  missing = rows[0]  # Line 2.
  os.remove(os.path.join(folder, "images", f"{missing['id']}.jpg"))
  with pytest.raises(builders.BadRowError, match=f"line 2 \\(id '{missing['id']}'\\): missing image"):
    builders.prepare(_fashion_config(folder, tmp_path / "data", top_k=None))
  builder = builders.prepare(_fashion_config(folder, tmp_path / "data", top_k=None,
                                             on_bad_row="skip"))
  report = builders.read_report(builder)
  assert report["skipped"][missing["split"]] == 1
  assert report["bad_rows"][missing["split"]][0]["id"] == missing["id"]
  assert sum(builder.info.splits[s].num_examples for s in builders.SPLITS) == len(rows) - 1


def test_fashion_ids_that_lead_outside_the_image_folder_are_bad_rows(fashion_sample, tmp_path):
  folder = _copy_folder(fashion_sample, tmp_path / "fashion")
  rows = _fashion_rows(folder)
  hostile = dict(rows[0], id="../../outside")
  secret = os.path.join(folder, "images", "..", "..", "outside.jpg")  # It exists; the error must not tell.
  shutil.copy(os.path.join(folder, "images", f"{rows[0]['id']}.jpg"), secret)
  with open(os.path.join(folder, "products.csv"), "a", newline="", encoding="utf-8") as f:
    csv.DictWriter(f, fieldnames=list(rows[0])).writerow(hostile)
  line = len(rows) + 2
  with pytest.raises(builders.BadRowError, match=rf"line {line} \(id '../../outside'\): image path "
                                                 r"'../../outside.jpg' leads outside the image folder"):
    builders.prepare(_fashion_config(folder, tmp_path / "data", top_k=None))
  builder = builders.prepare(_fashion_config(folder, tmp_path / "data", top_k=None, on_bad_row="skip"))
  assert sum(builder.info.splits[s].num_examples for s in builders.SPLITS) == len(rows)


def test_bad_split_value_is_reported_as_unassigned(tmp_path):
  rows = _base_rows()
  rows[1]["split"] = "holdout"  # cat1, line 3.
  folder = _write_folder(tmp_path / "shop", rows)
  with pytest.raises(builders.BadRowError, match="line 3 .*split 'holdout'"):
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))
  builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split",
                                            on_bad_row="skip"))
  report = builders.read_report(builder)
  assert report["skipped"][builders.UNASSIGNED] == 1
  assert report["bad_rows"][builders.UNASSIGNED][0]["id"] == "cat1"


@pytest.mark.parametrize("name", ["../../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"])
def test_image_paths_outside_the_folder_are_bad_rows_whether_or_not_the_file_exists(tmp_path, name):
  rows = [dict(row, image=f"{row['id']}.jpg") for row in _base_rows()]
  rows[1]["image"] = name  # cat1, line 3.
  folder = _write_folder(tmp_path / "shop", rows)
  messages = []
  for exists in (True, False):
    target = os.path.normpath(os.path.join(folder, "images", name))
    if exists and not os.path.exists(target):
      with open(target, "wb") as f:
        f.write(_jpeg((1, 2, 3)))
    if not exists and target.startswith(str(tmp_path)) and os.path.exists(target):
      os.remove(target)
    with pytest.raises(builders.BadRowError) as error:
      builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split",
                                      image_column="image"))
    messages.append(str(error.value))
  assert "line 3 (id 'cat1')" in messages[0] and "leads outside the image folder" in messages[0]
  if name != "/etc/hostname":  # That one exists either way; the others differ only in existence.
    assert messages[0] == messages[1]
  builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split",
                                            image_column="image", on_bad_row="skip"))
  assert "cat1" not in _read_all(builder, "train")
  assert builders.read_report(builder)["skipped"]["train"] == 1


def test_labels_differing_only_in_case_are_named_in_a_warning(tmp_path, caplog):
  rows = _base_rows()
  rows[0]["label"] = "Cat"
  folder = _write_folder(tmp_path / "shop", rows)
  with caplog.at_level(logging.WARNING):
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))
  assert any("differ only in case" in record.getMessage() and "Cat / cat" in record.getMessage()
             for record in caplog.records)


def test_a_replaced_photo_prepares_the_dataset_again(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  config = _folder_config(folder, tmp_path / "data", split_column="split")
  first = builders.prepare(config)
  assert builders.prepare(config).data_dir == first.data_dir  # Nothing changed: the same cache.
  photo = os.path.join(folder, "images", "cat0.jpg")
  with open(photo, "wb") as f:
    f.write(_jpeg((0, 250, 0), size=(10, 6)))
  second = builders.prepare(config)
  assert second.data_dir != first.data_dir
  stored = _read_all(second, "train")["cat0"]["image"]
  assert stored.shape == (6, 10, 3) and stored[..., 1].mean() > 200


def test_prepared_data_follows_image_bytes_not_modification_times(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  config = _folder_config(folder, tmp_path / "data", split_column="split")
  first = builders.prepare(config)
  photo = os.path.join(folder, "images", "cat0.jpg")
  stat = os.stat(photo)
  os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))  # A copy: same bytes, new time.
  assert builders.prepare(config).data_dir == first.data_dir
  other = _jpeg((0, 250, 0))  # Same size, same time, other bytes (zeros after the end marker).
  assert len(other) <= stat.st_size
  with open(photo, "wb") as f:
    f.write(other + bytes(stat.st_size - len(other)))
  os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**12))
  assert os.stat(photo).st_size == stat.st_size
  assert builders.prepare(config).data_dir != first.data_dir


def test_invalid_on_bad_row_is_an_error(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  with pytest.raises(ValueError, match="on_bad_row='ignore'"):
    builders.prepare(_folder_config(folder, tmp_path / "data", on_bad_row="ignore"))


def test_report_file_is_valid_json_next_to_the_data(tmp_path):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))
  with open(os.path.join(builder.data_dir, builders.REPORT_FILE)) as f:
    assert json.load(f)["examples"] == {"train": 8, "validation": 2, "test": 2}


# ---------------------------------------------------------------------------------------------------
# Catalogues at scale: photos checked in worker processes, rows streamed shard by shard, a rerun
# that reads nothing it read before.


def _examples_in_order(builder) -> dict[str, list[tuple]]:
  return {split: [(e["id"].decode(), e["title"].decode(), e["label"], e["image"].tobytes())
                  for e in map(builder.as_data_source(split).__getitem__,
                               range(len(builder.as_data_source(split))))]
          for split in builders.SPLITS}


def test_worker_processes_prepare_what_this_process_prepares_bad_rows_included(tmp_path,
                                                                              monkeypatch):
  case = _BadCase("dog4", "corrupt image", _IMAGE, folder_edit=_write_garbage_image)
  folder = case.make(tmp_path / "shop")
  for i, row in enumerate(_base_rows()):  # A photo of its own for every row, so none can swap.
    if row["id"] != "dog4":
      with open(os.path.join(folder, "images", f"{row['id']}.jpg"), "wb") as f:
        f.write(_jpeg((20 * i, 0, 0)))
  # One photo a task and two tasks in flight: the workers' answers queue up, as in a catalogue.
  monkeypatch.setattr(preparation, "_PHOTOS_PER_TASK", 1)
  monkeypatch.setattr(preparation, "_TASKS_IN_FLIGHT_PER_WORKER", 1)
  prepared = {}
  for workers in (0, 2):
    config = _folder_config(folder, tmp_path / f"data{workers}", split_column="split",
                            on_bad_row="skip", prepare_workers=workers)
    builder = builders.prepare(config)
    prepared[workers] = (_examples_in_order(builder), builders.read_report(builder))
  assert prepared[2] == prepared[0]
  examples, report = prepared[2]
  assert report["bad_rows"]["validation"][0]["line"] == case.line
  rows = [row for row in _base_rows() if row["id"] != "dog4"]
  for split in builders.SPLITS:  # CSV order within each split.
    assert [e[0] for e in examples[split]] == [r["id"] for r in rows if r["split"] == split]


def test_a_bad_photo_found_by_a_worker_stops_preparation_and_leaves_nothing(tmp_path):
  case = _BadCase("dog4", "corrupt image", _IMAGE, folder_edit=_truncate_image)
  folder = case.make(tmp_path / "shop")
  with pytest.raises(builders.BadRowError, match=f"line {case.line} .*corrupt image"):
    builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split",
                                    prepare_workers=2))
  leftovers = [os.path.join(d, name) for d, _, names in os.walk(tmp_path / "data") for name in names
               if "photo_hashes" not in d]
  assert leftovers == []


def test_rows_stream_into_shards_of_bounded_bytes(tmp_path, monkeypatch):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  photo = os.path.getsize(os.path.join(folder, "images", "cat0.jpg"))
  monkeypatch.setattr(preparation, "_SHARD_BYTES", 3 * photo)  # 3 photos a shard.
  builder = builders.prepare(_folder_config(folder, tmp_path / "data", split_column="split"))
  assert builder.info.splits["train"].shard_lengths == [3, 3, 2]
  assert [e[0] for e in _examples_in_order(builder)["train"]] == [
      row["id"] for row in _base_rows() if row["split"] == "train"]


def test_an_unchanged_catalogue_is_not_read_again(tmp_path, monkeypatch, opened_files):
  monkeypatch.setattr(photo_hashes, "RACY_WINDOW_NS", 0)  # Trust this test's fresh files.
  folder = _write_folder(tmp_path / "shop", _base_rows())
  config = _folder_config(folder, tmp_path / "data", split_column="split")
  first = builders.prepare(config)
  images = os.path.join(folder, "images")
  assert any(path.startswith(images) for path in opened_files)
  opened_files.clear()
  assert builders.prepare(config).data_dir == first.data_dir
  assert not [path for path in opened_files if path.startswith(images)]


def test_a_main_job_reads_each_catalogue_once(tmp_path, opened_files):
  folder = _write_folder(tmp_path / "shop", _base_rows())
  config = _folder_config(folder, tmp_path / "data", split_column="split")
  csv_path = os.path.join(folder, "products.csv")
  opened_files.clear()
  with builders.catalogues_read_once():
    names = {builders.builder_for(config).info.full_name for _ in range(3)}
  assert len(names) == 1 and opened_files.count(csv_path) == 2  # Parsed, then its sha256.
  builders.builder_for(config)  # Outside a job, every call reads it again.
  assert opened_files.count(csv_path) == 4
