"""Exact and sampled Shapley values of a game given as a batched value function.

A game over p players assigns a value to every coalition (subset of players). Here a coalition is a
bool mask of shape (p,), and a game is a `value_fn` that maps a batch of masks (k, p) to values (k,)
or (k, C) (e.g. one logit per class), so that a model scores many coalitions per call. This module is
model-agnostic; `jmmshap.mmshap` makes text tokens and image patches the players.

One coalition order is used everywhere (value tables, `coalition_masks`, error messages): coalition
index c holds player i iff bit i of c is set, so c = 0 is the empty coalition and c = 2**p - 1 the
full one.

Exact values need all 2**p coalitions, so they stop at `MAX_EXACT_PLAYERS`; above that (or above a
smaller `max_exact_players` in `shapley`) the values are estimated by permutation sampling or
KernelSHAP within an evaluation budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# 2**24 coalitions: about 17M value_fn rows, already minutes for a real model.
MAX_EXACT_PLAYERS = 24
METHODS = ("auto", "exact", "permutation", "kernel")

ValueFn = Callable[..., Any]


class ShapleyResult(NamedTuple):
  """Shapley values with the two values that fix their sum (efficiency: phi.sum(0) = full - empty).

  phi: (p,) or (p, C); value_empty, value_full: () or (C,); num_evaluations: value_fn rows spent
  (padding of the last chunk not counted); std_error: standard error of each phi for permutation
  sampling (NaN from a single permutation or antithetic pair), None for exact and KernelSHAP values.
  """
  phi: jax.Array
  value_empty: jax.Array
  value_full: jax.Array
  num_evaluations: int
  std_error: jax.Array | None = None


def coalition_masks(num_players: int) -> np.ndarray:
  """All 2**p coalitions as a host bool array (2**p, p): row c holds player i iff bit i of c is set."""
  _check_exact_players(num_players)
  indices = np.arange(1 << num_players, dtype=np.int64)
  return ((indices[:, None] >> np.arange(num_players)) & 1).astype(bool)


def coalition_mask_chunk(start: int | jax.Array, chunk_size: int, num_players: int) -> jax.Array:
  """Masks of coalitions start, ..., start + chunk_size - 1, built on device (jittable).

  `start` may be traced, so one compiled program serves every chunk. Indices past 2**p - 1 wrap
  around modulo 2**p: a padded last chunk still holds valid coalitions, whose values are discarded.
  """
  _check_exact_players(num_players)
  indices = jnp.asarray(start, jnp.int32) + jnp.arange(chunk_size, dtype=jnp.int32)
  return ((indices[:, None] >> jnp.arange(num_players, dtype=jnp.int32)) & 1).astype(bool)


def shapley_from_values(values: np.ndarray | jax.Array, num_players: int | None = None
                       ) -> np.ndarray | jax.Array:
  """Exact Shapley values from a table of all coalition values: values[..., 2**p] -> phi[..., p].

  The table follows the module's bit order. Viewing it per player i as (high bits, bit i, low bits),
  the two halves give the player's marginal gain v(S + i) - v(S) for every S without i; phi_i is
  their sum weighted by the Shapley weight of |S|. That is O(p 2**p) work in p vectorised steps.
  numpy input stays numpy (float64 for integer or float64 tables, and non-finite entries are
  reported by coalition); jax input stays jax and is jittable (set `jax_enable_x64` and pass float64
  for float64 accuracy; a NaN there propagates). Computation is in at least float32.
  `num_players`, when given, is checked against the table's length.
  """
  if isinstance(values, jax.Array):  # One compiled program instead of op-by-op dispatch.
    return _shapley_from_values_jit(values, num_players)
  return _shapley_from_values(values, num_players)


def _shapley_from_values(values, num_players=None):
  xp = jnp if isinstance(values, jax.Array) else np
  values = xp.asarray(values)
  if values.ndim == 0:
    raise ValueError("values must have a last axis of 2**p coalition values; got a scalar.")
  num_coalitions = values.shape[-1]
  players = num_coalitions.bit_length() - 1
  if num_coalitions < 1 or num_coalitions != 1 << players:
    raise ValueError(
        f"values has {num_coalitions} entries on its last axis; a table of all coalition values of p "
        "players has 2**p entries (index c holds player i iff bit i of c is set).")
  if num_players is not None and num_players != players:
    raise ValueError(
        f"values has {num_coalitions} = 2**{players} coalition values on its last axis, a game of "
        f"{players} players, but num_players={num_players}.")
  values = values.astype(xp.promote_types(values.dtype, xp.float32))
  if xp is np:
    _check_finite_table(values)
  batch_shape = values.shape[:-1]
  if players == 0:
    return xp.zeros(batch_shape + (0,), values.dtype)
  # Weight of each coalition S of the other p - 1 players, indexed like the flattened halves.
  half = num_coalitions // 2
  if xp is np:
    sizes = _popcounts(players - 1)
  else:
    sizes = jax.lax.population_count(jnp.arange(half, dtype=jnp.int32))
  weights = xp.asarray(_size_weights(players), values.dtype)[sizes]
  phi = []
  for player in range(players):
    by_bit = values.reshape(batch_shape + (half >> player, 2, 1 << player))
    gains = by_bit[..., 1, :] - by_bit[..., 0, :]
    phi.append(gains.reshape(batch_shape + (half,)) @ weights)
  return xp.stack(phi, axis=-1)


def exact_shapley(value_fn: ValueFn, num_players: int, *, chunk_size: int = 1024,
                  value_args: Sequence[Any] = (), jit: bool = True) -> ShapleyResult:
  """Exact Shapley values from all 2**p coalitions, evaluated in chunks of `chunk_size` masks.

  `value_fn(masks, *value_args)` maps bool masks (k, p) to values (k,) or (k, C). With `jit=True`
  mask building and `value_fn` run as one jitted program, compiled once per (value_fn, chunk shape);
  the last chunk is padded. `value_fn` is a static argument, so whatever it reads from a closure or
  a module is frozen into that program at its first call: pass anything that changes between calls
  (model state from `nnx.split`, an example's inputs) in `value_args`, which are traced, and reuse
  one `value_fn` (each new function object compiles anew). With `jit=False` only the masks are
  built by jitted code and `value_fn` is called as is, e.g. when it is already an `nnx.jit`
  function or runs host code.
  """
  _check_players(num_players)
  _check_exact_players(num_players)
  num_coalitions = 1 << num_players
  table = _evaluate_coalitions(value_fn, num_players, num_coalitions, mask_table=None,
                               chunk_size=chunk_size, value_args=value_args, jit=jit)
  return ShapleyResult(*_exact_from_table(table), num_coalitions)


def permutation_shapley(value_fn: ValueFn, num_players: int, *, key: jax.Array | int,
                        num_permutations: int | None = None, budget: int | None = None,
                        antithetic: bool = True, chunk_size: int = 1024,
                        value_args: Sequence[Any] = (), jit: bool = True) -> ShapleyResult:
  """Shapley values estimated from random player orders (pass `num_permutations` or `budget`).

  Each order adds the players one by one; a player's gain when it joins is an unbiased sample of
  its Shapley value, and the gains of one order telescope to v(full) - v(empty), so efficiency holds
  for every estimate. The empty and full coalitions are evaluated once and shared; each order costs
  p - 1 evaluations. With `antithetic`, every order is paired with its reverse (so
  `num_permutations` counts both and must be even): a player early in one is late in the other,
  which cancels part of the position effect (a small gain: on a 10-player game with pairwise
  interactions the error moved by at most about 15%, mostly down).
  `std_error` comes from the spread over independent orders (or pairs). Other arguments are as in
  `exact_shapley`.
  """
  _check_players(num_players)
  num_permutations = _permutation_count(num_players, num_permutations, budget, antithetic)
  if num_players == 1:
    return _single_player(value_fn, chunk_size, value_args, jit, with_std_error=True)
  order_count = num_permutations // 2 if antithetic else num_permutations
  bits = _random_bits(_as_key(key), order_count * num_players)
  positions, mask_table = _orders_and_masks(bits, order_count, num_players, antithetic)
  values = _evaluate_coalitions(value_fn, num_players, mask_table.shape[0], mask_table=mask_table,
                                chunk_size=chunk_size, value_args=value_args, jit=jit)
  phi, std_error = _permutation_estimate(values, positions, antithetic=antithetic)
  return ShapleyResult(phi, *_empty_and_full_values(values), mask_table.shape[0], std_error)


def kernel_shapley(value_fn: ValueFn, num_players: int, *, budget: int, key: jax.Array | int,
                   paired: bool = True, chunk_size: int = 1024, value_args: Sequence[Any] = (),
                   jit: bool = True) -> ShapleyResult:
  """KernelSHAP: Shapley values as the efficiency-constrained weighted least-squares fit of the game.

  Shapley values are the additive model phi minimising sum_S k(S) (v(S) - v(empty) - sum_{i in S}
  phi_i)**2 subject to sum(phi) = v(full) - v(empty), with the Shapley kernel k. Coalitions are
  drawn with probability proportional to k (a size s with mass proportional to 1 / (s (p - s)),
  then a uniform subset of that size), so the sampled fit is unweighted. The constraint is met
  exactly by eliminating the last player. With `paired`, each draw also evaluates its complement
  (same kernel weight), which balances the fit (15-30% lower error on a 10-player game with
  pairwise interactions).
  `budget` counts every value_fn row including the empty and full coalitions. Coalitions are drawn
  with replacement, so for small p exact values are cheaper. Other arguments are as in
  `exact_shapley`.
  """
  _check_players(num_players)
  num_samples = _kernel_sample_count(num_players, budget, paired)
  if num_players == 1:
    return _single_player(value_fn, chunk_size, value_args, jit, with_std_error=False)
  draws = num_samples // 2 if paired else num_samples
  bits = _random_bits(_as_key(key), draws * (num_players + 1))
  sampled = _kernel_coalitions(bits, draws, num_players, paired)
  mask_table = jnp.concatenate([_empty_and_full(num_players), sampled])
  values = _evaluate_coalitions(value_fn, num_players, mask_table.shape[0], mask_table=mask_table,
                                chunk_size=chunk_size, value_args=value_args, jit=jit)
  phi = _kernel_solve(sampled, values)
  return ShapleyResult(phi, *_empty_and_full_values(values), mask_table.shape[0])


def default_budget(num_players: int) -> int:
  """Sampling budget when none is given: 2 p + 2048 evaluations (the `shap` package's default)."""
  return 2 * num_players + 2048


def shapley(value_fn: ValueFn, num_players: int, *, method: str = "auto",
            max_exact_players: int = 16, budget: int | None = None,
            key: jax.Array | int | None = None, chunk_size: int = 1024,
            value_args: Sequence[Any] = (), jit: bool = True) -> ShapleyResult:
  """Exact Shapley values up to `max_exact_players` players, sampled ones above (method='auto').

  'auto' samples with KernelSHAP (paired), which had 25-45% lower error than antithetic
  permutations at equal budget (10 players with pairwise interactions, budgets 200 to 20000);
  'permutation' is there when a standard error is wanted.
  `budget` (default `default_budget(p)`) and `key` are used only when sampling, and a sampling
  method needs a `key` (a `jax.random.key` or an int seed) so that results are reproducible.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; choose one of {', '.join(map(repr, METHODS))}.")
  if not 0 <= max_exact_players <= MAX_EXACT_PLAYERS:
    raise ValueError(
        f"max_exact_players={max_exact_players}; exact values are computed for at most "
        f"{MAX_EXACT_PLAYERS} players (2**{MAX_EXACT_PLAYERS} evaluations).")
  _check_players(num_players)
  if method == "auto":
    method = "exact" if num_players <= max_exact_players else "kernel"
  common = dict(chunk_size=chunk_size, value_args=value_args, jit=jit)
  if method == "exact":
    return exact_shapley(value_fn, num_players, **common)
  if key is None:
    raise ValueError(
        f"method={method!r} for {num_players} players samples coalitions at random: pass "
        "key=jax.random.key(seed) (or an int seed) so the estimate is reproducible.")
  if budget is None:
    budget = default_budget(num_players)
  if method == "permutation":
    return permutation_shapley(value_fn, num_players, budget=budget, key=key, **common)
  return kernel_shapley(value_fn, num_players, budget=budget, key=key, **common)


# --------------------------------------------------------------------------------------------------
# Shapley weights and tables.


def _size_weights(num_players: int) -> np.ndarray:
  """w[s] = s! (p - 1 - s)! / p!: the chance that a player joins right after a given s-coalition."""
  return np.array([1.0 / (num_players * math.comb(num_players - 1, s)) for s in range(num_players)])


def _popcounts(num_bits: int) -> np.ndarray:
  """Number of set bits of 0 .. 2**num_bits - 1 (index c + 2**k has one bit more than c)."""
  counts = np.zeros(1, np.int64)
  for _ in range(num_bits):
    counts = np.concatenate([counts, counts + 1])
  return counts


_shapley_from_values_jit = jax.jit(_shapley_from_values, static_argnames="num_players")


@jax.jit
def _exact_from_table(table: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """phi (p,) or (p, C) and the empty and full values, from a table (2**p,) or (2**p, C)."""
  phi = jnp.moveaxis(_shapley_from_values(jnp.moveaxis(table, 0, -1)), -1, 0)
  return phi, table[0], table[-1]


# --------------------------------------------------------------------------------------------------
# Evaluating coalitions in chunks.


def _chunk_masks(start: jax.Array, mask_table: jax.Array | None, *, num_players: int,
                 chunk_size: int) -> jax.Array:
  """Exact games enumerate coalitions by index; sampled ones gather rows of a drawn mask table."""
  if mask_table is None:
    return coalition_mask_chunk(start, chunk_size, num_players)
  rows = jnp.minimum(start + jnp.arange(chunk_size, dtype=jnp.int32), mask_table.shape[0] - 1)
  return mask_table[rows]


_chunk_masks_jit = jax.jit(_chunk_masks, static_argnames=("num_players", "chunk_size"))


@functools.partial(jax.jit, static_argnames=("value_fn", "num_players", "chunk_size"))
def _evaluate_chunk(start: jax.Array, mask_table: jax.Array | None, value_args: tuple[Any, ...], *,
                    value_fn: ValueFn, num_players: int, chunk_size: int) -> jax.Array:
  masks = _chunk_masks(start, mask_table, num_players=num_players, chunk_size=chunk_size)
  return value_fn(masks, *value_args)


def _evaluate_coalitions(value_fn: ValueFn, num_players: int, num_rows: int, *,
                         mask_table: jax.Array | None, chunk_size: int,
                         value_args: Sequence[Any], jit: bool) -> jax.Array:
  """Values of `num_rows` coalitions, (num_rows,) or (num_rows, C), checked to be finite."""
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}; it must be a positive int (masks per value_fn call).")
  chunk = min(chunk_size, num_rows)
  num_chunks = -(-num_rows // chunk)
  value_args = tuple(value_args)
  table = None
  for start in range(0, num_rows, chunk):
    start_index = jnp.asarray(start, jnp.int32)
    if jit:
      values = _evaluate_chunk(start_index, mask_table, value_args, value_fn=value_fn,
                               num_players=num_players, chunk_size=chunk)
    else:
      masks = _chunk_masks_jit(start_index, mask_table, num_players=num_players, chunk_size=chunk)
      values = jnp.asarray(value_fn(masks, *value_args))
    _check_value_shape(values, chunk, num_players)
    if num_chunks == 1:
      table = values
      break
    if table is None:
      table = jnp.zeros((num_chunks * chunk,) + values.shape[1:], values.dtype)
    table = _write_chunk(table, values, start_index)
  values, all_finite = _finish_table(table, num_rows)
  if not bool(all_finite):
    row = int(jnp.argmin(jnp.isfinite(values.reshape(num_rows, -1)).all(axis=1)))
    mask = _chunk_masks_jit(jnp.asarray(row, jnp.int32), mask_table, num_players=num_players,
                            chunk_size=1)
    raise ValueError(
        f"value_fn returned {np.asarray(values[row]).tolist()} for "
        f"{_describe_coalition(np.asarray(mask[0]))}. Shapley values need a finite value for every "
        "coalition: check what value_fn computes when the other players are masked out.")
  return values


# The table is donated, so each chunk is written in place: no per-chunk copy of the whole table and
# no join of thousands of pieces (2**24 coalitions are 16384 chunks of 1024).
@functools.partial(jax.jit, donate_argnums=0)
def _write_chunk(table: jax.Array, values: jax.Array, start: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(table, values.astype(table.dtype), start, axis=0)


@functools.partial(jax.jit, static_argnames="num_rows")
def _finish_table(table: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """The values without the last chunk's padding, in at least float32, and whether all are finite."""
  values = table[:num_rows]
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  return values, jnp.isfinite(values).all()


def _check_value_shape(values: Any, rows: int, num_players: int) -> None:
  shape = getattr(values, "shape", None)
  if shape is None or len(shape) not in (1, 2) or shape[0] != rows:
    returned = f"shape {tuple(shape)}" if shape is not None else type(values).__name__
    raise ValueError(
        f"value_fn returned {returned} for masks of shape ({rows}, {num_players}); it must return "
        f"one value per mask row: an array of shape ({rows},) or ({rows}, C).")


def _describe_coalition(mask: np.ndarray) -> str:
  players = np.flatnonzero(mask).tolist()
  index = sum(1 << i for i in players)
  shown = ", ".join(map(str, players[:32]))
  if len(players) > 32:
    shown += f", ... ({len(players)} players)"
  return f"coalition {index} (players [{shown}] of {mask.shape[0]}; bit i of the index is player i)"


def _check_finite_table(values: np.ndarray) -> None:
  bad = ~np.isfinite(values)
  if bad.any():
    position = np.unravel_index(np.argmax(bad), values.shape)
    coalition = int(position[-1])
    players = max(values.shape[-1].bit_length() - 1, 0)
    mask = (coalition >> np.arange(players)) & 1
    where = f" at batch position {tuple(int(i) for i in position[:-1])}" if values.ndim > 1 else ""
    raise ValueError(
        f"values holds {values[position]}{where} for {_describe_coalition(mask.astype(bool))}; "
        "Shapley values need a finite value for every coalition.")


# --------------------------------------------------------------------------------------------------
# Sampling.


def _as_key(key: jax.Array | int) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


def _empty_and_full(num_players: int) -> jax.Array:
  """The first two mask rows of every sampler: their values fix the sum of phi."""
  return jnp.stack([jnp.zeros(num_players, bool), jnp.ones(num_players, bool)])


@jax.jit
def _empty_and_full_values(values: jax.Array) -> tuple[jax.Array, jax.Array]:
  return values[0], values[1]


def _single_player(value_fn, chunk_size, value_args, jit, *, with_std_error):
  """One player gets v(full) - v(empty) exactly, from 2 evaluations, whatever the sampler."""
  result = exact_shapley(value_fn, 1, chunk_size=chunk_size, value_args=value_args, jit=jit)
  return result._replace(std_error=jnp.zeros_like(result.phi) if with_std_error else None)


def _permutation_count(num_players: int, num_permutations: int | None, budget: int | None,
                       antithetic: bool) -> int:
  if (num_permutations is None) == (budget is None):
    raise ValueError("permutation_shapley needs exactly one of num_permutations or budget.")
  smallest = 2 if antithetic else 1
  if num_permutations is not None:
    if num_permutations < smallest or (antithetic and num_permutations % 2):
      raise ValueError(
          f"num_permutations={num_permutations}; it must be a positive"
          + (" even number, as antithetic sampling pairs every order with its reverse "
             "(or pass antithetic=False)." if antithetic else " number."))
    return num_permutations
  if num_players == 1:
    count = smallest
  else:
    count = (budget - 2) // (num_players - 1)
    count -= count % 2 if antithetic else 0
  if budget < 2 or count < smallest:
    needed = 2 + smallest * max(num_players - 1, 0)
    raise ValueError(
        f"budget={budget} is too small for permutation sampling of {num_players} players: the "
        f"empty and full coalitions cost 2 evaluations and each order {num_players - 1}; "
        f"pass budget >= {needed}.")
  return count


# Random bits come as fixed-size 1-D blocks, so one compiled generator serves every budget and
# player count: each new 2-D shape of `jax.random.bits` compiles for seconds on CPU.
_RANDOM_BLOCK_SIZE = 1 << 16


@jax.jit
def _random_bits_block(key: jax.Array, block: jax.Array) -> jax.Array:
  return jax.random.bits(jax.random.fold_in(key, block), (_RANDOM_BLOCK_SIZE,), jnp.uint32)


def _random_bits(key: jax.Array, count: int) -> jax.Array:
  """At least `count` random uint32 (whole blocks; consumers take the first `count`)."""
  blocks = [_random_bits_block(key, jnp.asarray(block, jnp.uint32))
            for block in range(max(1, -(-count // _RANDOM_BLOCK_SIZE)))]
  return jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]


@functools.partial(jax.jit, static_argnames=("order_count", "num_players", "antithetic"))
def _orders_and_masks(bits: jax.Array, order_count: int, num_players: int, antithetic: bool
                      ) -> tuple[jax.Array, jax.Array]:
  """Random orders (sorting random bits) as positions (n, p): when player j joins order n.

  Mask rows to evaluate: empty, full, then for each order its prefixes of sizes 1 .. p - 1.
  """
  bits = bits[:order_count * num_players].reshape(order_count, num_players)
  orders = jnp.argsort(bits, axis=1)
  if antithetic:
    orders = jnp.concatenate([orders, orders[:, ::-1]])
  positions = jnp.argsort(orders, axis=1)
  prefix_sizes = jnp.arange(1, num_players)
  prefixes = positions[:, None, :] < prefix_sizes[None, :, None]
  return positions, jnp.concatenate([_empty_and_full(num_players), prefixes.reshape(-1, num_players)])


@functools.partial(jax.jit, static_argnames="antithetic")
def _permutation_estimate(values: jax.Array, positions: jax.Array, *, antithetic: bool
                          ) -> tuple[jax.Array, jax.Array]:
  count, num_players = positions.shape
  value_shape = values.shape[1:]
  prefix_values = values[2:].reshape((count, num_players - 1) + value_shape)
  chain = jnp.concatenate([jnp.broadcast_to(values[0], (count, 1) + value_shape), prefix_values,
                           jnp.broadcast_to(values[1], (count, 1) + value_shape)], axis=1)
  gains = jnp.diff(chain, axis=1)  # gains[n, k]: what the k-th player to join order n adds.
  contributions = jax.vmap(lambda gain, position: gain[position])(gains, positions)
  if antithetic:  # An order and its reverse are one draw; their mean is the independent unit.
    contributions = (contributions[:count // 2] + contributions[count // 2:]) / 2
  phi = contributions.mean(axis=0)
  std_error = contributions.std(axis=0, ddof=1) / np.sqrt(contributions.shape[0])
  return phi, std_error


def _kernel_sample_count(num_players: int, budget: int | None, paired: bool) -> int:
  if budget is None:
    raise ValueError("kernel_shapley needs a budget (value_fn evaluations, empty and full included).")
  if num_players == 1:
    if budget < 2:
      raise ValueError(f"budget={budget}; one player needs 2 evaluations (empty and full).")
    return 0
  # The fit has p - 1 free values after efficiency; pairs come two at a time.
  smallest = num_players - 1 + ((num_players - 1) % 2 if paired else 0)
  samples = budget - 2 - ((budget - 2) % 2 if paired else 0)
  if samples < smallest:
    raise ValueError(
        f"budget={budget} is too small for KernelSHAP over {num_players} players: besides the empty "
        f"and full coalitions the fit needs at least {smallest} sampled ones; pass budget >= "
        f"{2 + smallest} (and several times that for a usable estimate).")
  return samples


@functools.partial(jax.jit, static_argnames=("draws", "num_players", "paired"))
def _kernel_coalitions(bits: jax.Array, draws: int, num_players: int, paired: bool) -> jax.Array:
  """Coalitions drawn from the Shapley kernel, from random bits (n, p + 1); no empty or full one.

  Column 0 picks the size s with probability proportional to 1 / (s (p - s)): the kernel weight
  (p - 1) / (C(p, s) s (p - s)) of one s-coalition times the C(p, s) of them. The other columns
  order the players at random, and the first s form a uniform s-subset.
  """
  bits = bits[:draws * (num_players + 1)].reshape(draws, num_players + 1)
  sizes = jnp.arange(1, num_players)
  size_mass = 1.0 / (sizes * (num_players - sizes)).astype(jnp.float32)
  cumulative = jnp.cumsum(size_mass) / size_mass.sum()
  uniform = (bits[:, 0] >> 8).astype(jnp.float32) * 2.0 ** -24
  drawn_sizes = jnp.minimum(jnp.searchsorted(cumulative, uniform, side="right"), num_players - 2) + 1
  positions = jnp.argsort(jnp.argsort(bits[:, 1:], axis=1), axis=1)
  masks = positions < drawn_sizes[:, None]
  return jnp.concatenate([masks, ~masks]) if paired else masks


@jax.jit
def _kernel_solve(sampled: jax.Array, values: jax.Array) -> jax.Array:
  """Least squares with phi_last = total - sum(phi_rest) substituted, so efficiency is exact."""
  members = sampled.astype(values.dtype)
  value_empty, value_full = values[0], values[1]
  gains = values[2:] - value_empty
  total = value_full - value_empty
  last = members[:, -1].reshape((-1,) + (1,) * (gains.ndim - 1))
  design = members[:, :-1] - members[:, -1:]
  phi_rest = jnp.linalg.lstsq(design, gains - last * total)[0]
  return jnp.concatenate([phi_rest, (total - phi_rest.sum(axis=0))[None]])


def _check_players(num_players: int) -> None:
  if (not isinstance(num_players, (int, np.integer)) or isinstance(num_players, bool)
      or num_players < 1):
    raise ValueError(f"num_players={num_players!r}; a game needs a positive int number of players.")


def _check_exact_players(num_players: int) -> None:
  if not isinstance(num_players, (int, np.integer)) or num_players < 0:
    raise ValueError(f"num_players={num_players!r}; it must be a non-negative int.")
  if num_players > MAX_EXACT_PLAYERS:
    raise ValueError(
        f"Exact Shapley values of {num_players} players need all 2**{num_players} = "
        f"{2 ** num_players:,} coalitions; the limit is {MAX_EXACT_PLAYERS} players. Estimate them "
        "instead: shapley(value_fn, num_players, method='kernel' or 'permutation', budget=..., "
        "key=...).")
