"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(run: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
  """Median wall time of `run()` until its outputs are ready; the warm-up call compiles."""
  if warm_up:
    jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)
