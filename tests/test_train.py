"""train.py: which settings a command line set explicitly (eval mode holds them against the run
saved in the workdir), and a user's mistake told in one line (`error: <message>`, exit status 2)."""

import csv
import os

import train_subprocess
from PIL import Image

import train
from configs import meta, text


def test_explicit_settings_are_the_config_flags_and_an_explicit_variant():
  config = text.get_config("fashion")  # As the flags below leave it.
  config.update(num_epochs=3, mode="eval")
  config.data.manual_dir = "/data"
  argv = ["train.py", "--config=configs/text.py:fashion", "--workdir=W", "--config.num_epochs=3",
          "--config.data.manual_dir=/data", "--config.mode=eval"]
  assert train.explicit_settings(argv, config) == {
      "variant": "fashion", "num_epochs": 3, "data.manual_dir": "/data", "mode": "eval"}
  # The default variant, not named: not explicit, so eval takes the saved run's.
  assert train.explicit_settings(["train.py", "--config=configs/meta.py", "--workdir=W"],
                                 meta.get_config()) == {}


def test_a_bad_override_stops_with_one_error_line_and_status_2_before_any_work(tmp_path):
  root = tmp_path / "w"
  result = train_subprocess.run_script("train.py", "--config=configs/text.py", f"--workdir={root}",
                                       "--config.batch_size=-5")
  assert (train_subprocess.user_error(result)
          == "config.stage='text': batch_size=-5: must be a positive integer.")
  assert not root.exists()


def test_evaluating_a_workdir_with_nothing_trained_is_one_error_line_and_status_2(tmp_path):
  root = tmp_path / "w"
  result = train_subprocess.run_script("train.py", "--config=configs/text.py", f"--workdir={root}",
                                       "--config.mode=eval")
  assert train_subprocess.user_error(result) == (
      f"{root / 'text' / 'config.json'} not found: nothing was trained into {root / 'text'} to "
      "evaluate; train it first (the same command without --config.mode=eval).")


def _jpeg(path) -> None:
  Image.new("RGB", (8, 8), (200, 40, 40)).save(path, format="JPEG")


def test_a_bad_row_stops_with_one_error_line_naming_it_and_status_2(tmp_path):
  """A product folder whose CSV names a photo that is not there (data.name=product_folder)."""
  folder = tmp_path / "shop"
  os.makedirs(folder / "images")
  rows = [(f"{label}{i}", f"{label} thing {i}", label, split) for label in ("cat", "dog")
          for i, split in enumerate(("train", "train", "validation", "test"))]
  with open(folder / "products.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "text", "label", "split"])
    writer.writerows(rows)
  for product_id, *_ in rows:
    if product_id != "dog1":  # Line 7.
      _jpeg(folder / "images" / f"{product_id}.jpg")
  result = train_subprocess.run_script(
      "train.py", "--config=configs/text.py:taimd17k", f"--workdir={tmp_path / 'w'}",
      f"--config.data.manual_dir={folder}", f"--config.data.data_dir={tmp_path / 'data'}",
      "--config.data.prepare_workers=0")
  message = train_subprocess.user_error(result)
  assert message.startswith(f"Bad row in {folder / 'products.csv'}, line 7 (id 'dog1'): missing "
                            f"image file: {folder / 'images' / 'dog1.jpg'}"), message
  assert "on_bad_row=skip" in message
