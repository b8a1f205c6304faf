r"""Trains and evaluates one stage of the jmmshap pipeline.

  python train.py --config=configs/text.py --workdir=/tmp/jmmshap
  python train.py --config=configs/text.py:fashion --workdir=W \
      --config.data.manual_dir=../shared/data/fashion-products
  python train.py --config=configs/text.py --workdir=W --config.mode=eval

Several processes (one per host) train one model together: under SLURM or Open MPI `srun`/`mpirun`
starts them and JAX finds its peers by itself; elsewhere give each process the coordinator's address,
the process count and its own index (README, "Multi-host").
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jmmshap import parallel, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and reports go.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same for every process (multi-process "
    "runs outside SLURM/Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes taking part; 1 forces a single process inside a cluster job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent XLA compilation cache (a local or shared folder): a "
    "rerun, a resumed run or another stage with the same shapes skips compiling. Default: off, "
    "unless JAX_COMPILATION_CACHE_DIR is set.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "GPUs this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per "
    "host under SLURM, where JAX otherwise gives each task one GPU.")


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
  logging.set_verbosity(logging.INFO)
  # Orbax reports every file it touches at INFO; keep the log about the run.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  if _COMPILATION_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE_DIR.value)
  local_device_ids = ([int(i) for i in _LOCAL_DEVICE_IDS.value]
                      if _LOCAL_DEVICE_IDS.value is not None else None)
  parallel.initialize_distributed(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  local_device_ids)
  logging.info("process %d of %d; local devices %s; %d devices in all", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, explicit_settings(sys.argv, _CONFIG.value))
  finally:
    parallel.release_devices()


if __name__ == "__main__":
  app.run(main)
