"""What the meta stage reads: the base learners' logits and the MMBT's MM-SHAP shares.

Every file is checked before it is stacked: the three learners must describe the same examples (by
id, in any order), the same labels and the same classes in the same order; logits must be finite;
the shares must belong to examples the MMBT was evaluated on. Each error names the file, the row or
id, and what to rerun.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from jmmshap import workdir

LEARNERS = ("text", "image", "mmbt")
SHARES_STAGE = "mmshap"


@dataclasses.dataclass(frozen=True)
class SplitOutputs:
  """The three base learners' logits on one split, rows aligned by example id."""
  split: str
  ids: np.ndarray  # (N,) str, in the text learner's order.
  labels: np.ndarray  # (N,) int
  logits: dict[str, np.ndarray]  # learner -> (N, C) float32
  class_names: tuple[str, ...]
  paths: dict[str, str]  # learner -> the npz file read

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _load_npz(path: str, keys: Sequence[str], stage: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise workdir.StageNotTrained(f"{path} not found: run the {stage} stage into this workdir "
                                  "first (python train.py --config=configs/meta.py --workdir=... "
                                  "runs every missing stage).")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [key for key in keys if key not in data.files]
      if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(data.files)}): it "
                         f"was not written by the {stage} stage; run that stage again "
                         f"(--config.rerun={stage}).")
      return {key: data[key] for key in keys}
  except (OSError, EOFError, zipfile.BadZipFile) as error:
    # Outputs are written whole (temp file + rename); a broken one is from an interrupted write of
    # an older version, or was damaged since.
    raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}): it is incomplete "
                     f"or damaged. Build it again with --config.rerun={stage}.") from None


def first_values(values: np.ndarray, count: int = 3) -> str:
  shown = ", ".join(repr(str(v)) for v in values[:count])
  return shown + (", ..." if len(values) > count else "")


def check_class_names(reference: Sequence[str], reference_path: str, names: Sequence[str],
                       path: str) -> None:
  reference, names = list(reference), list(names)
  if reference == names:
    return
  if len(reference) != len(names) or set(reference) != set(names):
    raise ValueError(
        f"{path} has {len(names)} classes ({first_values(np.asarray(names))}) but {reference_path} has "
        f"{len(reference)} ({first_values(np.asarray(reference))}): every stage must be trained on the "
        "same dataset; rerun the stages whose data differ (--config.rerun=...).")
  index = next(i for i, (a, b) in enumerate(zip(reference, names, strict=True)) if a != b)
  raise ValueError(
      f"{path} and {reference_path} list the same classes in a different order (index {index}: "
      f"{names[index]!r} vs {reference[index]!r}), so their logit columns mean different classes: "
      "rerun the stages whose data differ (--config.rerun=...).")


def _check_finite(values: np.ndarray, ids: np.ndarray, path: str, what: str, fix: str) -> None:
  bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(f"{path}: {int(bad.sum())} of {len(bad)} rows of {what} are NaN or infinite "
                     f"(first: row {row}, id {str(ids[row])!r}); {fix}")


def _check_unique(ids: np.ndarray, path: str) -> None:
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{path}: ids {first_values(unique[counts > 1])} occur more than once; each example "
                     "must have one row. Rerun the stage that wrote it.")


def load_base_outputs(root: str, split: str) -> SplitOutputs:
  """The text, image and mmbt logits of a split, checked to describe the same examples and classes."""
  reference = None
  logits, paths = {}, {}
  for learner in LEARNERS:
    path = workdir.path(root, learner, workdir.logits_file(split))
    arrays = _load_npz(path, ("logits", "labels", "ids", "class_names"), learner)
    ids, labels = arrays["ids"].astype(str), arrays["labels"].astype(np.int32)
    class_names = [str(name) for name in arrays["class_names"]]
    values = arrays["logits"]
    if values.ndim != 2 or values.shape != (len(ids), len(class_names)) or len(labels) != len(ids):
      raise ValueError(f"{path}: logits {values.shape}, {len(ids)} ids, {len(labels)} labels and "
                       f"{len(class_names)} class names do not fit together; rerun the {learner} stage.")
    _check_finite(values, ids, path, "logits",
                  f"the {learner} model diverged or its checkpoint is broken: retrain it "
                  f"(--config.rerun={learner}).")
    _check_unique(ids, path)
    if reference is None:
      reference = {"ids": ids, "labels": labels, "class_names": class_names, "path": path}
      order = np.arange(len(ids))
    else:
      check_class_names(reference["class_names"], reference["path"], class_names, path)
      order = _align(reference["ids"], reference["path"], ids, path)
      mismatch = labels[order] != reference["labels"]
      if mismatch.any():
        row = int(np.argmax(mismatch))
        raise ValueError(
            f"{path} labels example {str(reference['ids'][row])!r} as class {int(labels[order][row])} but "
            f"{reference['path']} as class {int(reference['labels'][row])}: the stages read "
            "different data; rerun the stages whose data differ (--config.rerun=...).")
    logits[learner] = values[order].astype(np.float32)
    paths[learner] = path
  return SplitOutputs(split, reference["ids"], reference["labels"], logits,
                      tuple(reference["class_names"]), paths)


def _align(reference_ids: np.ndarray, reference_path: str, ids: np.ndarray, path: str) -> np.ndarray:
  """Row order that puts `ids` in `reference_ids`' order; both must hold the same examples."""
  position = {example_id: row for row, example_id in enumerate(ids)}
  missing = np.asarray([i for i in reference_ids if i not in position])
  extra = np.setdiff1d(ids, reference_ids)
  if len(missing) or len(extra):
    raise ValueError(
        f"{path} and {reference_path} do not hold the same examples: {len(missing)} ids of the "
        f"second are missing from the first ({first_values(missing)}) and {len(extra)} are extra "
        f"({first_values(extra)}). The stages were evaluated on different data; rerun the stages whose "
        "data differ (--config.rerun=...).")
  return np.asarray([position[i] for i in reference_ids], np.int64)


@dataclasses.dataclass(frozen=True)
class Shares:
  """The MMBT's MM-SHAP shares on one split, in the rows of a `SplitOutputs`."""
  t_shap: np.ndarray  # (N,) NaN where not computed or undefined.
  v_shap: np.ndarray
  explained: np.ndarray  # (N,) bool: MM-SHAP ran on this example.
  path: str

  @property
  def defined(self) -> np.ndarray:
    return self.explained & np.isfinite(self.t_shap) & np.isfinite(self.v_shap)


def shares_path(root: str, split: str) -> str:
  return workdir.path(root, SHARES_STAGE, workdir.shares_file(split))


def load_shares(root: str, outputs: SplitOutputs) -> Shares:
  """T-SHAP and V-SHAP of `W/mmshap/mmshap_{split}.npz`, checked against the base learners' ids."""
  path = shares_path(root, outputs.split)
  arrays = _load_npz(path, ("ids", "t_shap", "v_shap"), "mmshap")
  ids = arrays["ids"].astype(str)
  t_shap, v_shap = arrays["t_shap"].astype(np.float64), arrays["v_shap"].astype(np.float64)
  if t_shap.shape != ids.shape or v_shap.shape != ids.shape:
    raise ValueError(f"{path}: {len(ids)} ids but t_shap {t_shap.shape} and v_shap {v_shap.shape}; "
                     "rerun the mmshap stage (--config.rerun=mmshap).")
  _check_unique(ids, path)
  with np.load(path, allow_pickle=False) as data:
    if "class_names" in data.files:
      check_class_names(outputs.class_names, outputs.paths["mmbt"],
                         [str(name) for name in data["class_names"]], path)
  row_of = {example_id: row for row, example_id in enumerate(outputs.ids)}
  unknown = np.asarray([i for i in ids if i not in row_of])
  if len(unknown):
    raise ValueError(
        f"{path} explains {len(unknown)} examples that {outputs.paths['mmbt']} does not hold "
        f"({first_values(unknown)}): MM-SHAP ran on other data or another model; rerun it "
        "(--config.rerun=mmshap).")
  rows = np.asarray([row_of[i] for i in ids], np.int64)
  count = len(outputs.ids)
  explained = np.zeros(count, bool)
  explained[rows] = True
  t_full, v_full = np.full(count, np.nan), np.full(count, np.nan)
  t_full[rows], v_full[rows] = t_shap, v_shap
  return Shares(t_full, v_full, explained, path)
