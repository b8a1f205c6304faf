r"""Trains and evaluates one stage of the jmmshap pipeline.

  python train.py --config=configs/text.py --workdir=/tmp/jmmshap
  python train.py --config=configs/text.py:fashion --workdir=W \
      --config.data.manual_dir=../shared/data/fashion-products
  python train.py --config=configs/text.py --workdir=W --config.mode=eval
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jmmshap import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax reports every file it touches at INFO; keep the log about the run.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  stages.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
