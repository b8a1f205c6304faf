"""Data parallelism over a device mesh: params replicated, batches split along the `data` axis.

One code path serves one CPU, one GPU, all GPUs of a host and several hosts (`jax.distributed`): each
process feeds its own slice of the global batch and `jax.make_array_from_process_local_data` assembles
the global array.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


# The variables by which `jax.distributed.initialize()` recognises a SLURM job step or an Open MPI job.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OPEN_MPI = "OMPI_MCA_orte_hnp_uri"


def cluster_process_count() -> int | None:
  """How many processes the SLURM step or Open MPI job running this one has; None outside both."""
  if all(name in os.environ for name in _SLURM_STEP):
    return int(os.environ["SLURM_NTASKS"])
  if _OPEN_MPI in os.environ:
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts `jax.distributed` when asked to or when launched as one of several cluster processes.

  Must run before anything touches a device. Arguments left None are detected from the SLURM or Open
  MPI environment by JAX itself; `num_processes=1` forces a single process even inside such a job.
  Returns whether the distributed runtime was started.
  """
  if num_processes == 1:
    return False
  detected = cluster_process_count()
  asked = (coordinator_address, num_processes, process_id, local_device_ids) != (None,) * 4
  if not asked and (detected or 1) == 1:
    return False
  if detected is None:
    missing = [f"--{name}" for name, value in (
        ("coordinator_address", coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")),
        ("num_processes", num_processes), ("process_id", process_id)) if value is None]
    if missing:
      raise ValueError(f"multi-process training outside SLURM or Open MPI needs {', '.join(missing)} "
                       "as well (the same coordinator address and process count on every process).")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=list(local_device_ids) if local_device_ids else None)
  return True


def release_devices() -> None:
  """Waits for all device work and frees every device buffer, while the interpreter is whole.

  Why: a buffer made from a numpy array can alias it, and XLA's own threads release such buffers
  (and their Python references) when pending work ends. A native thread that takes the GIL while
  the interpreter is shutting down is terminated by Python with a forced unwind, and where that
  unwind meets C++ code it aborts the process ("FATAL: exception not rethrown", exit -6) after
  the run has succeeded. `train.py` calls this before returning so nothing is left to release.
  """
  jax.effects_barrier()
  for array in jax.live_arrays():
    array.delete()
  gc.collect()


def usable_cores() -> int:
  """The cores this process may run on (as a job scheduler set them), for sizing its helpers."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return cores or 1


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over every device of every process (or over `devices`), ordered by process.

  Process p's devices hold the p-th block of rows of a global batch, the rows
  `input_pipeline.process_slice` has it read and `multihost_utils.process_allgather` puts p-th.
  `devices=jax.local_devices()`: a process's own mesh, for work it does without the others.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda device: (device.process_index, device.id))
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, what: str = "batch_size") -> int:
  """The per-process share of a global batch; the batch must split evenly over devices."""
  if batch_size % jax.device_count():
    raise ValueError(
        f"{what}={batch_size} does not split over {jax.device_count()} devices: "
        f"use a multiple of {jax.device_count()}.")
  return batch_size // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded over the data axis.

  Only numeric arrays go to the devices; host-side fields such as string ids are left out.
  """
  sharding = data_sharded(mesh)
  out = {}
  for name, value in batch.items():
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
      out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """The same values, built alike by every process (same seed, same checkpoint), on every device.

  With several processes each one contributes its own copy: `jax.device_put` cannot send typed PRNG
  keys (nnx dropout streams) to other processes' devices, and would compare every leaf across
  processes first.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(value):
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      key_data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(value)))
      return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(value))
    return jax.make_array_from_process_local_data(sharding, np.asarray(value))

  return jax.tree.map(put, tree)
