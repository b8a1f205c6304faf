"""Data parallelism over a device mesh: params replicated, batches split along the `data` axis.

One code path serves one CPU, one GPU, all GPUs of a host and several hosts (`jax.distributed`): each
process feeds its own slice of the global batch and `jax.make_array_from_process_local_data` assembles
the global array.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


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
  return jax.device_put(tree, replicated(mesh))
