"""Two fake CPU devices for every test, so sharded code paths run as on a multi-device host; and the
one tiny-config helper every test that trains a stage starts from."""

import os

# Tiny test programs: XLA's expensive CPU optimisation passes cost more compile time than they save.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                      "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

# pylint: disable=wrong-import-position  (after the environment above)
import importlib
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
import pytest
import train_subprocess

from jmmshap import pipeline

_BERT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "patch_size": 16}
_RUN = {"batch_size": 16, "eval_batch_size": 16, "total_steps": 2, "log_every_steps": 1}


def _under(prefix: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  return {f"{prefix}{key}": value for key, value in settings.items()}


# Per stage, dotted overrides of its toyshop config: 1-layer, 16-wide towers and 2 steps, so a run
# is seconds, nearly all of it compilation.
TINY = {
    "text": {**_RUN, "data.max_length": 10, "data.vocab_size": 200, **_under("model.", _BERT)},
    "image": {**_RUN, "model.width": 4},
    "clip_pretrain": {**_RUN, "data.max_length": 10, **_under("model.clip.", _CLIP),
                      "model.embed_dim": 8},
    "mmbt": {**_RUN, "data.max_length": 10, **_under("model.bert.", _BERT),
             **_under("model.clip.", _CLIP)},
    "mmshap": {"max_text_players": 2, "examples_per_group": 8},
}
# 48 training products (12 classes x 4), 24 validation, 24 test.
TINY_DATA = {"toyshop.train_per_class": 4, "toyshop.validation_per_class": 2,
             "toyshop.test_per_class": 2}
TINY_META = {"meta.hidden_size": 16, "meta.num_steps": 20, "meta.eval_every_steps": 10,
             "meta.checkpoint_every_steps": 20}


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys as `--config.a.b=v` flags would."""
  for key, value in overrides.items():
    pipeline.set_field(config, key, value)
  return config


class Tiny:
  """Tiny toyshop configs of every stage; `overrides` (dotted keys) go on top."""

  # The session's tiny main job (`tiny_main_job`): cross-fit meta-models (the config's default:
  # out-of-fold scores, from which predict's 'auto' is chosen) with early stopping on each fold.
  MAIN_JOB = {"meta.early_stopping": True}

  @staticmethod
  def overrides(stage: str, data_dir: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dotted overrides of a tiny stage config (for train.py's flags too)."""
    data = {} if stage == "mmshap" else {"data.data_dir": data_dir, **_under("data.", TINY_DATA)}
    return {**data, **TINY[stage], **(extra or {})}

  @staticmethod
  def config(stage: str, data_dir: str,
             overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{stage}").get_config("toyshop")
    return with_overrides(config, Tiny.overrides(stage, data_dir, overrides))

  @staticmethod
  def pipeline_overrides(data_dir: str, extra: Mapping[str, Any] | None = None,
                         arg: str = "toyshop") -> dict[str, Any]:
    """The dotted overrides of the tiny main job; the data config is given once, at the top."""
    stages = importlib.import_module("configs.meta").get_config(arg).stages
    return {"data.data_dir": data_dir, **_under("data.", TINY_DATA), **TINY_META,
            **{key: value for name in stages for key, value in _under(f"stages.{name}.",
                                                                       TINY[name]).items()},
            **(extra or {})}

  @staticmethod
  def pipeline(data_dir: str, overrides: Mapping[str, Any] | None = None,
               arg: str = "toyshop") -> ml_collections.ConfigDict:
    """The main job with every stage tiny (`arg`: configs/meta.py's variant and options)."""
    config = importlib.import_module("configs.meta").get_config(arg)
    return with_overrides(config, Tiny.pipeline_overrides(data_dir, overrides, arg))


@pytest.fixture(scope="session")
def tiny() -> type[Tiny]:
  return Tiny


UPSTREAM_LEARNERS = ("text", "image", "mmbt")


@pytest.fixture(scope="session")
def tiny_learners(tmp_path_factory, tiny):
  """copy(workdir): puts the tiny main job's learners (text, image, mmbt; trained once per session)
  into a workdir, where the main job reuses them and runs only MM-SHAP and the meta stage. Returns
  the data_dir they were trained on."""
  root = tmp_path_factory.mktemp("tiny_learners")
  data_dir = str(root / "tfds")
  config = tiny.pipeline(data_dir)
  trained = str(root / "workdir")
  for name in UPSTREAM_LEARNERS:
    pipeline.run(config.stages[name], trained)

  def copy(workdir: str) -> str:
    for name in UPSTREAM_LEARNERS:
      shutil.copytree(os.path.join(trained, name), os.path.join(workdir, name))
    return data_dir

  return copy


@pytest.fixture(scope="session")
def tiny_main_job(tmp_path_factory, tiny, tiny_learners):
  """(workdir, config) of the tiny main job, finished once per session on the session's learners;
  a test reads it and never changes it (copy what a test changes)."""
  path = str(tmp_path_factory.mktemp("tiny_main_job") / "workdir")
  config = tiny.pipeline(tiny_learners(path), tiny.MAIN_JOB)
  pipeline.run(config, path)
  return path, config


# The stronger image learner's options, all on: crops and flips, label smoothing, a moving average
# of the params, flip-averaged evaluation. 4 steps, validation and checkpoints at steps 2 and 4.
IMAGE_OPTIONS = {"random_flip": True, "random_crop": True, "crop_area": (0.3, 0.7),
                 "label_smoothing": 0.3, "ema_decay": 0.5, "eval_flip_average": True,
                 "total_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                 "optimizer.learning_rate": 0.02}


@pytest.fixture(scope="session")
def with_options(tmp_path_factory, tiny):
  """(config, workdir, report) of a tiny image stage trained with every option of IMAGE_OPTIONS;
  shared by the tests of the stage and of scripts/eval_options.py: a test that rewrites its files
  leaves them as they were, and one that changes them works on a copy."""
  root = tmp_path_factory.getbasetemp()
  config = tiny.config("image", str(root / "tfds_stages"), IMAGE_OPTIONS)
  job = str(tmp_path_factory.mktemp("image_options"))
  report = pipeline.run(config, job)
  return config, job, report


_opened: list[str] | None = None  # Files opened in this process, while `opened_files` records.


def _record_open(event: str, args: tuple) -> None:
  if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
    _opened.append(os.fsdecode(os.fspath(args[0])))


sys.addaudithook(_record_open)  # An audit hook cannot be removed: it records only when asked.


@pytest.fixture
def opened_files():
  """The paths this process opens (Python's `open` audit event, raised by every file open) while
  the test runs: how a test sees that files are not read, without timing anything."""
  global _opened
  _opened = []
  try:
    yield _opened
  finally:
    _opened = None


@pytest.fixture(autouse=True, scope="module")
def no_training_process_outlives_its_module():
  """Kills any train.py a module's tests started and left running (a failed fixture, say)."""
  yield
  train_subprocess.kill_all()
