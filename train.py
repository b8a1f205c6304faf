r"""Trains and evaluates one stage of the jmmshap pipeline.

  python train.py --config=configs/text.py --workdir=/tmp/jmmshap
  python train.py --config=configs/text.py:fashion --workdir=W \
      --config.data.manual_dir=../shared/data/fashion-products
  python train.py --config=configs/text.py --workdir=W --config.mode=eval

Several processes (one per host) train one model together: under SLURM or Open MPI `srun`/`mpirun`
starts them and JAX finds its peers by itself; elsewhere give each process the coordinator's address,
the process count and its own index (docs/MULTIHOST.md, "Several hosts"; the flags are
`jmmshap/launch.py`'s).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jmmshap import errors, launch, parallel, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
flags.mark_flags_as_required(["config", "workdir"])


def explicit_settings(argv: list[str], config) -> dict:
  """The settings the command line set (`--config.a.b=v`, and the variant of `--config=FILE:V`),
  as parsed: eval mode holds them against the run saved in the workdir."""
  explicit = {}
  for arg in argv[1:]:
    if arg.startswith("--config=") and ":" in arg:
      explicit["variant"] = config.get("variant")
    elif arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      value = config
      for part in key.split("."):
        value = value[part]
      explicit[key] = value
  return explicit


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.start()
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, explicit_settings(sys.argv, _CONFIG.value))
  finally:
    parallel.release_devices()


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
