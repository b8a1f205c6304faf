"""The start every command-line entry point shares (train.py, predict.py): logging, the XLA
compilation cache, and the multi-process runtime, with the flags that set them.

Several processes (one per host) run one job: under SLURM or Open MPI `srun`/`mpirun` starts them
and JAX finds its peers by itself; elsewhere each process is given the coordinator's address, the
process count and its own index (docs/MULTIHOST.md, "Several hosts").
"""

from __future__ import annotations

import jax
from absl import flags, logging

from jmmshap import parallel

COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, the same for every process (multi-process "
    "runs outside SLURM/Open MPI).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes taking part; 1 forces a single process inside a cluster job.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent XLA compilation cache (a local or shared folder): a "
    "rerun, a resumed run or another stage with the same shapes skips compiling. Default: off, "
    "unless JAX_COMPILATION_CACHE_DIR is set.")
LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "GPUs this process drives, e.g. 0,1,2,3,4,5,6,7 for one process per "
    "host under SLURM, where JAX otherwise gives each task one GPU.")


def start() -> None:
  """Logging at INFO (without Orbax's per-file lines), the compilation cache, then
  `jax.distributed` when the flags or the cluster ask for several processes. Before any device
  work."""
  logging.set_verbosity(logging.INFO)
  # Orbax reports every file it touches at INFO; keep the log about the run.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  if COMPILATION_CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_DIR.value)
  local_device_ids = ([int(i) for i in LOCAL_DEVICE_IDS.value]
                      if LOCAL_DEVICE_IDS.value is not None else None)
  parallel.initialize_distributed(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                  local_device_ids)
  logging.info("process %d of %d; local devices %s; %d devices in all", jax.process_index(),
               jax.process_count(), jax.local_devices(), jax.device_count())
