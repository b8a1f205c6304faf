"""What the meta stage reads is checked first: each mismatch between the learners' files, or with
the shares, names the files, rows and ids."""

import os

import numpy as np
import pytest

import fakes
from jmmshap import learner_outputs

def test_base_learners_with_different_class_counts_name_both_files(tmp_path):
  workdir = fakes.fake_workdir(str(tmp_path))
  data = np.load(os.path.join(workdir, "image", "logits_test.npz"))
  fakes.write_logits(workdir, "image", "test", data["logits"][:, :3], data["labels"], data["ids"],
                fakes.CLASS_NAMES[:3])
  with pytest.raises(ValueError, match=r"image/logits_test.npz has 3 classes .*/text/logits_test"
                                       r".npz has 4"):
    learner_outputs.load_base_outputs(workdir, "test")


def test_base_learners_with_another_label_order_are_refused(tmp_path):
  workdir = fakes.fake_workdir(str(tmp_path))
  data = np.load(os.path.join(workdir, "mmbt", "logits_validation.npz"))
  swapped = (fakes.CLASS_NAMES[1], fakes.CLASS_NAMES[0], *fakes.CLASS_NAMES[2:])
  fakes.write_logits(workdir, "mmbt", "validation", data["logits"], data["labels"], data["ids"], swapped)
  with pytest.raises(ValueError, match=r"mmbt/logits_validation.npz and .*text/logits_validation.npz "
                                       r"list the same classes in a different order \(index 0"):
    learner_outputs.load_base_outputs(workdir, "validation")


def test_ids_in_another_order_are_aligned_but_other_ids_are_refused(tmp_path):
  workdir = fakes.fake_workdir(str(tmp_path))
  data = dict(np.load(os.path.join(workdir, "image", "logits_test.npz")))
  order = np.random.default_rng(1).permutation(len(data["ids"]))
  fakes.write_logits(workdir, "image", "test", data["logits"][order], data["labels"][order],
                data["ids"][order])
  outputs = learner_outputs.load_base_outputs(workdir, "test")
  np.testing.assert_array_equal(outputs.logits["image"], data["logits"])
  ids = data["ids"].copy()
  ids[2] = "someone-else"
  fakes.write_logits(workdir, "image", "test", data["logits"], data["labels"], ids)
  with pytest.raises(ValueError, match=r"image/logits_test.npz and .*text/logits_test.npz do not "
                                       r"hold the same examples: 1 ids .* \('test-2'\)"):
    learner_outputs.load_base_outputs(workdir, "test")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_logits_name_the_file_row_and_id(tmp_path, bad_value):
  workdir = fakes.fake_workdir(str(tmp_path))
  data = dict(np.load(os.path.join(workdir, "text", "logits_validation.npz")))
  data["logits"][5, 1] = bad_value
  fakes.write_logits(workdir, "text", "validation", data["logits"], data["labels"], data["ids"])
  with pytest.raises(ValueError, match=r"text/logits_validation.npz: 1 of 24 rows of logits are NaN "
                                       r"or infinite \(first: row 5, id 'validation-5'\)"):
    learner_outputs.load_base_outputs(workdir, "validation")


def test_shares_of_examples_the_learners_never_saw_are_refused(tmp_path):
  workdir = fakes.fake_workdir(str(tmp_path))
  outputs = learner_outputs.load_base_outputs(workdir, "validation")
  fakes.write_shares(workdir, "validation", ["elsewhere-1", *outputs.ids[1:]], np.full(24, 0.5))
  with pytest.raises(ValueError, match=r"mmshap_validation.npz explains 1 examples that .*mmbt/"
                                       r"logits_validation.npz does not hold \('elsewhere-1'\)"):
    learner_outputs.load_shares(workdir, outputs)


@pytest.mark.parametrize("stage, name", [("mmshap", "mmshap_test.npz"),
                                         ("image", "logits_validation.npz")])
def test_a_half_written_output_names_the_file_and_the_rerun_that_rebuilds_it(tmp_path, stage, name):
  workdir = fakes.fake_workdir(str(tmp_path))
  path = os.path.join(workdir, stage, name)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:  # As an older version's interrupted, non-atomic write left it.
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf"{name} cannot be read .*incomplete or damaged.*"
                                       rf"--config.rerun={stage}"):
    for split in ("validation", "test"):
      learner_outputs.load_shares(workdir, learner_outputs.load_base_outputs(workdir, split))
