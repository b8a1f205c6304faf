"""Synthetic workdirs for the meta stage: base learners' logits and MM-SHAP shares written as the
stages write them (not a test module itself)."""

import os

import numpy as np

from configs import meta as meta_configs
from jmmshap import workdir
from jmmshap.builders import EVAL_SPLITS

CLASS_NAMES = ("lamp", "mug", "design/red-circle", "design/blue-square")


def write_logits(root, learner, split, logits, labels, ids, class_names=CLASS_NAMES):
  os.makedirs(workdir.stage_dir(root, learner), exist_ok=True)
  np.savez(workdir.path(root, learner, workdir.logits_file(split)), logits=np.asarray(logits, np.float32),
           labels=np.asarray(labels, np.int32), ids=np.asarray(ids), class_names=np.asarray(class_names))


def write_shares(root, split, ids, t_shap, class_names=CLASS_NAMES):
  os.makedirs(workdir.stage_dir(root, "mmshap"), exist_ok=True)
  t_shap = np.asarray(t_shap, np.float64)
  np.savez(workdir.path(root, "mmshap", workdir.shares_file(split)), ids=np.asarray(ids), t_shap=t_shap,
           v_shap=1 - t_shap, class_names=np.asarray(class_names))


def fake_workdir(root, *, per_class=(6, 5), seed=0, mmbt_classes=(0, 1, 2, 3)):
  """Base learners each right on their own classes: text on 0-1, image on 2-3, mmbt on
  `mmbt_classes` (all four by default, where it is right on most examples); noise elsewhere."""
  rng = np.random.default_rng(seed)
  num_classes = len(CLASS_NAMES)
  for split, count in zip(EVAL_SPLITS, per_class, strict=True):
    labels = np.repeat(np.arange(num_classes), count)
    ids = np.asarray([f"{split}-{i}" for i in range(len(labels))])
    onehot = np.eye(num_classes)[labels]
    text = 4 * onehot * (labels < 2)[:, None] + rng.normal(size=onehot.shape)
    image = 4 * onehot * (labels >= 2)[:, None] + rng.normal(size=onehot.shape)
    mmbt = 2 * onehot * np.isin(labels, mmbt_classes)[:, None] + rng.normal(size=onehot.shape)
    for learner, logits in (("text", text), ("image", image), ("mmbt", mmbt)):
      write_logits(root, learner, split, logits, labels, ids)
    write_shares(root, split, ids, np.where(labels < 2, 0.8, 0.3))
  return root


def meta_config(**meta_overrides):
  config = meta_configs.get_config("toyshop")
  config.meta.update(hidden_size=16, num_steps=40, eval_every_steps=20, checkpoint_every_steps=20,
                     log_every_steps=10)
  config.meta.update(meta_overrides)
  return config
