"""scripts/collapse_benchmark.py: the shortcut really collapses the MMBT, the paired tests, the
per-group scores and the JSON the script writes."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from configs import mmshap as mmshap_configs
from conftest import with_overrides
from jmmshap import learner_outputs, pipeline, toyshop

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "collapse_benchmark.py")
_SPEC = importlib.util.spec_from_file_location("collapse_benchmark", _PATH)
collapse = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = collapse
_SPEC.loader.exec_module(collapse)

# A tiny MMBT that does learn the photos: 288 training products, 32-wide towers, 8 px patches, 24
# epochs. Without the shortcut its V-SHAP on the image-decided test products measured 0.55 and
# 0.63 (seeds 0 and 1); at full strength 0.0003 and 0.07.
LEARNING_MMBT = {"data.toyshop.train_per_class": 24, "data.toyshop.validation_per_class": 1,
                 "data.toyshop.test_per_class": 4, "num_epochs": 24, "total_steps": 0,
                 "batch_size": 32, "model.bert.hidden_size": 32, "model.bert.intermediate_size": 64,
                 "model.clip.hidden_size": 32, "model.clip.intermediate_size": 64,
                 "model.clip.patch_size": 8}
COLLAPSED_BELOW, LEARNT_ABOVE = 0.15, 0.35


@pytest.fixture(scope="module")
def image_shares(tmp_path_factory, tiny):
  """strength -> the MMBT's mean V-SHAP on the image-decided test products, shortcut off and full."""
  data_dir = str(tmp_path_factory.mktemp("collapse_tfds"))
  shares = {}
  for strength in (None, 1.0):
    root = str(tmp_path_factory.mktemp(f"collapse_{strength}"))
    pipeline.run(tiny.config("mmbt", data_dir, {**LEARNING_MMBT,
                                                "data.toyshop.shortcut_strength": strength}), root)
    pipeline.run(with_overrides(mmshap_configs.get_config("toyshop"), {
        "max_text_players": 2, "examples_per_group": 16, "splits": ("test",)}), root)
    with np.load(os.path.join(root, "mmshap", "mmshap_test.npz")) as explained:
      image_decided = np.char.startswith(explained["class_names"][explained["labels"]].astype(str),
                                         "design/")
      v_shap = explained["v_shap"][image_decided]
    assert image_decided.sum() == 16 and np.isfinite(v_shap).all()
    shares[strength] = float(v_shap.mean())
  return shares


def test_full_shortcut_strength_collapses_the_mmbts_image_share_on_image_decided_products(
    image_shares):
  assert image_shares[1.0] < COLLAPSED_BELOW < LEARNT_ABOVE < image_shares[None], image_shares


def test_paired_test_over_seeds_pins_t_test_and_exact_sign_flip_values():
  baseline = [0.90, 0.91, 0.92, 0.93, 0.94]
  better = [b + d for b, d in zip(baseline, [0.01, 0.02, 0.03, 0.04, 0.05])]
  result = collapse.paired_test(better, baseline)
  assert result["mean_difference"] == pytest.approx(0.03)
  assert result["std_difference"] == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1) / 100)
  assert result["t"] == pytest.approx(4.2426, abs=1e-3)  # 0.03 / (0.0158 / sqrt(5)).
  assert result["p_t_test"] == pytest.approx(0.0132, abs=2e-4)  # Student's t, 4 degrees of freedom.
  assert result["p_sign_flip"] == pytest.approx(2 / 32)  # All 5 the same sign: 2 of 32 patterns.
  mixed = collapse.paired_test([0.51, 0.49, 0.52], [0.5, 0.5, 0.5])
  assert mixed["p_sign_flip"] == pytest.approx(6 / 8)  # |sum| >= 0.02 in 6 of the 8 patterns.
  assert collapse.paired_test([0.5, 0.6], [0.5, 0.6])["p_t_test"] == 1.0
  assert collapse.paired_test([0.5], [0.4])["p_t_test"] is None


def test_group_f1_is_the_mean_f1_of_the_groups_classes_in_the_whole_decision():
  labels = np.asarray([0, 0, 1, 1, 2, 2, 3, 3])
  predictions = np.asarray([0, 1, 1, 1, 2, 3, 3, 0])
  reliance = ["text", "text", "image", "both"]
  per_class = f1_score(labels, predictions, average=None)
  assert collapse.group_f1(labels, predictions, reliance) == pytest.approx(
      {"text": per_class[:2].mean(), "image": per_class[2], "both": per_class[3]})


def test_line_word_classes_name_the_label_in_train_at_full_strength_and_any_design_in_test():
  spec = toyshop.ToyshopSpec(train_per_class=5, validation_per_class=1, test_per_class=20,
                             shortcut_strength=1.0)
  labels = {e["id"]: e["label"] for e in toyshop.examples(spec, "train")}
  named = collapse.line_word_classes(spec, "train")
  assert len(named) == 5 * spec.num_image_classes
  assert all(named[example_id] == labels[example_id] for example_id in named)
  test_labels = {e["id"]: e["label"] for e in toyshop.examples(spec, "test")}
  named = collapse.line_word_classes(spec, "test")
  assert set(named.values()) == {n for n in test_labels.values() if n.startswith("design/")}
  assert np.mean([named[i] == test_labels[i] for i in named]) < 0.5  # Chance: about 1/4.


def test_records_summaries_and_the_written_json_hold_every_field(tiny_main_job, tmp_path):
  root, config = tiny_main_job
  spec = toyshop.ToyshopSpec(**config.data.toyshop.to_dict())
  record = collapse.run_record(root, spec)
  predictions = np.load(os.path.join(root, "meta", "predictions_test.npz"))
  stacked = predictions["probabilities"][list(predictions["methods"]).index("stacked")]
  assert record["methods"]["stacked"]["f1_macro"] == pytest.approx(
      f1_score(predictions["labels"], stacked.argmax(-1), average="macro",
               labels=range(spec.num_classes)))
  outputs = learner_outputs.load_base_outputs(root, "test")
  shares = learner_outputs.load_shares(root, outputs)
  image_rows = np.char.startswith(np.asarray(outputs.class_names)[outputs.labels], "design/")
  assert record["mmbt"]["v_shap"]["image"] == pytest.approx(shares.v_shap[image_rows].mean())
  assert "follows_line_word" not in record["mmbt"]  # No shortcut in the tiny main job's data.

  records = []
  for seed, shift in enumerate([0.0, 0.01, 0.03]):
    seeded = copy.deepcopy(record) | {"seed": seed, "strength": 1.0}
    seeded["methods"]["mmshap_sample"]["f1_macro"] -= shift
    records.append(seeded)
  result = {"command": "python scripts/collapse_benchmark.py", "collapse_strength": 1.0,
            "weightings": collapse.WEIGHTINGS, "overrides": {}, "wall_s": 1.0,
            "strengths": {"1": collapse.summarise(records)}, "runs": records}
  collapse.write(result, str(tmp_path))
  with open(tmp_path / collapse.JSON_NAME) as f:
    written = json.load(f)
  at = written["strengths"]["1"]
  assert at["seeds"] == [0, 1, 2]
  sample = at["methods"]["mmshap_sample"]["f1_macro"]
  assert sample["values"] == pytest.approx([record["methods"]["mmshap_sample"]["f1_macro"] - s
                                            for s in (0.0, 0.01, 0.03)])
  assert sample["std"] == pytest.approx(np.std([0.0, 0.01, 0.03], ddof=1))
  assert set(at["methods"]["stacked"]["groups"]) == {"text", "image", "both"}
  assert at["vs_stacked"]["mmshap_sample"]["mean_difference"] == pytest.approx(
      record["methods"]["mmshap_sample"]["f1_macro"] - record["methods"]["stacked"]["f1_macro"]
      - 0.04 / 3)
  assert {"p_t_test", "p_sign_flip", "t", "std_difference"} <= set(at["vs_stacked"]["mmbt"])
  assert "stacked" not in at["vs_stacked"]
  assert set(at["mmbt"]) == {"v_shap", "accuracy"} and "image" in at["image_learner"]["accuracy"]
  assert {"command", "wall_s", "runs", "collapse_strength", "weightings"} <= set(written)
  table = (tmp_path / collapse.TABLE_NAME).read_text()
  assert "| mmshap_sample |" in table and "p (sign-flip)" in table
  assert (tmp_path / collapse.PLOT_NAME).stat().st_size > 0
