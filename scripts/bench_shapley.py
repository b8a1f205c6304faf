"""Times the exact Shapley engine: the table reduction at p = 20 and coalition throughput.

  PYTHONPATH=. python scripts/bench_shapley.py --output=bench_shapley.json

(from the repository root; PYTHONPATH is not needed once the package is pip-installed).

Every timing is taken after a warm-up call (so compilation is excluded) and is the median of
`--repeats` runs, each waited for with `block_until_ready`. The value function is deliberately
cheap (a linear score of the mask), so the throughput numbers measure the engine's own overhead:
mask building, chunk dispatch and the final reduction.
"""

from __future__ import annotations

import json
import platform

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jmmshap import shapley as shapley_lib
from timing import median_seconds  # scripts/timing.py

_OUTPUT = flags.DEFINE_string("output", "bench_shapley.json", "Where to write the JSON results.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (the median is kept).")
_TABLE_PLAYERS = flags.DEFINE_integer("table_players", 20, "p for the shapley_from_values timing.")
_EXACT_PLAYERS = flags.DEFINE_list("exact_players", ["8", "12", "16"],
                                   "Player counts for the exact_shapley throughput.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 4096, "Coalitions per value_fn call.")


def bench_table(num_players: int, repeats: int) -> dict:
  table = np.random.default_rng(0).normal(size=2 ** num_players)
  table_f32 = jnp.asarray(table, jnp.float32)
  reduce_jit = jax.jit(shapley_lib.shapley_from_values)
  return {
      "num_players": num_players,
      "num_values": 2 ** num_players,
      "jax_float32_jit_s": median_seconds(lambda: reduce_jit(table_f32), repeats),
      "numpy_float64_s": median_seconds(lambda: shapley_lib.shapley_from_values(table), repeats),
  }


def linear_score(masks: jax.Array, weights: jax.Array) -> jax.Array:
  return masks.astype(jnp.float32) @ weights


def bench_exact(num_players: int, chunk_size: int, repeats: int) -> dict:
  weights = jnp.linspace(-1.0, 1.0, num_players)
  seconds = median_seconds(
      lambda: shapley_lib.exact_shapley(linear_score, num_players, chunk_size=chunk_size,
                                        value_args=(weights,)).phi, repeats)
  result = shapley_lib.exact_shapley(linear_score, num_players, chunk_size=chunk_size,
                                     value_args=(weights,))
  max_error = float(jnp.max(jnp.abs(result.phi - weights)))  # A linear game's phi is its weights.
  return {
      "num_players": num_players,
      "num_coalitions": result.num_evaluations,
      "chunk_size": min(chunk_size, result.num_evaluations),
      "seconds": seconds,
      "coalitions_per_s": result.num_evaluations / seconds,
      "max_abs_error_vs_closed_form": max_error,
  }


def main(argv: list[str]) -> None:
  del argv
  repeats = _REPEATS.value
  results = {
      "device": str(jax.devices()[0]),
      "device_count": jax.device_count(),
      "jax_version": jax.__version__,
      "python": platform.python_version(),
      "repeats": repeats,
      "shapley_from_values": bench_table(_TABLE_PLAYERS.value, repeats),
      "exact_shapley": [bench_exact(int(p), _CHUNK_SIZE.value, repeats)
                        for p in _EXACT_PLAYERS.value],
  }
  with open(_OUTPUT.value, "w") as f:
    json.dump(results, f, indent=2)

  table = results["shapley_from_values"]
  print(f"device {results['device']}, jax {results['jax_version']}, median of {repeats} runs")
  print(f"shapley_from_values, p={table['num_players']} ({table['num_values']:,} values): "
        f"jax float32 jit {table['jax_float32_jit_s'] * 1e3:.1f} ms, "
        f"numpy float64 {table['numpy_float64_s'] * 1e3:.1f} ms (goal < 200 ms)")
  for row in results["exact_shapley"]:
    print(f"exact_shapley, p={row['num_players']:2d}: {row['num_coalitions']:>7,} coalitions in "
          f"{row['seconds'] * 1e3:8.1f} ms = {row['coalitions_per_s']:,.0f} coalitions/s "
          f"(chunk {row['chunk_size']}, max error {row['max_abs_error_vs_closed_form']:.1e})")
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
