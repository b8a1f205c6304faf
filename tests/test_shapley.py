"""Shapley value engine: exact tables against definitions and `shap`, axioms, samplers, errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmmshap import shapley as shapley_lib


def brute_force_shapley(table: np.ndarray, num_players: int) -> np.ndarray:
  """The definition: each player's gain when it joins, averaged over all p! orders."""
  phi = np.zeros(num_players)
  for order in itertools.permutations(range(num_players)):
    coalition = 0
    for player in order:
      phi[player] += table[coalition | (1 << player)] - table[coalition]
      coalition |= 1 << player
  return phi / math.factorial(num_players)


def table_of(game, num_players: int) -> np.ndarray:
  """Values of a game given on host masks, in the module's bit order."""
  return np.array([game(mask) for mask in shapley_lib.coalition_masks(num_players)], np.float64)


def bit_index(masks: np.ndarray) -> np.ndarray:
  return masks.astype(np.int64) @ (1 << np.arange(masks.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Masks and the exact table.


def test_coalition_masks_follow_bit_order():
  masks = shapley_lib.coalition_masks(3)
  assert masks.shape == (8, 3) and masks.dtype == bool
  np.testing.assert_array_equal(masks[0], [False, False, False])
  np.testing.assert_array_equal(masks[1], [True, False, False])
  np.testing.assert_array_equal(masks[6], [False, True, True])
  np.testing.assert_array_equal(masks[7], [True, True, True])
  np.testing.assert_array_equal(bit_index(masks), np.arange(8))


def test_coalition_mask_chunk_is_jittable_and_wraps_past_the_full_coalition():
  build = jax.jit(shapley_lib.coalition_mask_chunk, static_argnums=(1, 2))
  chunk = np.asarray(build(jnp.int32(5), 4, 3))  # Rows 5, 6, 7 and the padding row 8 = 0 mod 8.
  np.testing.assert_array_equal(chunk, shapley_lib.coalition_masks(3)[[5, 6, 7, 0]])


@pytest.mark.parametrize("num_players", range(1, 8))
def test_shapley_from_values_matches_permutation_definition(num_players):
  table = np.random.default_rng(num_players).normal(size=2 ** num_players)
  expected = brute_force_shapley(table, num_players)
  np.testing.assert_allclose(shapley_lib.shapley_from_values(table), expected, rtol=0, atol=1e-12)
  as_float32 = shapley_lib.shapley_from_values(jnp.asarray(table, jnp.float32))
  assert isinstance(as_float32, jax.Array)
  np.testing.assert_allclose(as_float32, expected, rtol=0, atol=1e-5)


_SHAP_EXACT_SCRIPT = """
import json, sys
import numpy as np
import shap
tables = [np.asarray(t) for t in json.load(sys.stdin)]
results = []
for table in tables:
  p = table.size.bit_length() - 1
  bits = 1 << np.arange(p)
  # shap masks a feature by replacing it with the background value: x = 1 keeps player i, 0 drops it.
  model = lambda x, table=table, bits=bits: table[(np.asarray(x) > 0.5).astype(np.int64) @ bits]
  explainer = shap.ExactExplainer(model, shap.maskers.Independent(np.zeros((1, p)), max_samples=1))
  explanation = explainer(np.ones((1, p)), silent=True)
  results.append({"phi": explanation.values[0].tolist(),
                  "base": float(np.ravel(explanation.base_values)[0])})
json.dump(results, sys.stdout)
"""


@pytest.mark.skipif(importlib.util.find_spec("shap") is None, reason="shap is a test extra")
def test_shapley_from_values_matches_shap_exact_explainer():
  # With one all-zeros background row and the all-ones input, shap's masked model at coalition S is
  # exactly table[S], so its ExactExplainer values are the Shapley values of the table, and its base
  # value is v(empty). It runs in a child with numba's JIT off: the same algorithm in Python, without
  # ~20 s of numba compilation on a small CPU.
  rng = np.random.default_rng(7)
  tables = [rng.normal(size=2 ** p) for p in range(1, 9)]
  child = subprocess.run([sys.executable, "-c", _SHAP_EXACT_SCRIPT], input=json.dumps(
      [t.tolist() for t in tables]), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NUMBA_DISABLE_JIT": "1"}, check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  for table, result in zip(tables, json.loads(child.stdout)):
    np.testing.assert_allclose(shapley_lib.shapley_from_values(table), result["phi"], rtol=0,
                               atol=1e-12)
    assert result["base"] == table[0]


def test_shapley_from_values_is_float64_accurate_with_x64():
  table = np.random.default_rng(3).normal(size=2 ** 12) * 100.0
  expected = shapley_lib.shapley_from_values(table)  # numpy float64.
  with jax.enable_x64(True):
    phi = jax.jit(shapley_lib.shapley_from_values)(jnp.asarray(table, jnp.float64))
    assert phi.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(phi), expected, rtol=0, atol=1e-11)


def test_shapley_from_values_keeps_leading_batch_axes():
  tables = np.random.default_rng(4).normal(size=(2, 3, 2 ** 4))
  phi = shapley_lib.shapley_from_values(tables)
  assert phi.shape == (2, 3, 4)
  for index in np.ndindex(2, 3):
    np.testing.assert_allclose(phi[index], brute_force_shapley(tables[index], 4), atol=1e-12)
  phi_jit = jax.jit(shapley_lib.shapley_from_values)(jnp.asarray(tables, jnp.float32))
  np.testing.assert_allclose(phi_jit, phi, atol=1e-5)


def test_shapley_from_values_of_integer_tables_is_float():
  votes = np.array([0, 0, 0, 1])  # Two players, unanimity: 1/2 each.
  np.testing.assert_array_equal(shapley_lib.shapley_from_values(votes), [0.5, 0.5])


# --------------------------------------------------------------------------------------------------
# Axioms on random games.


@pytest.mark.parametrize("num_players", [3, 6, 9])
def test_efficiency_values_sum_to_full_minus_empty(num_players):
  table = np.random.default_rng(10 + num_players).normal(size=2 ** num_players)
  phi = shapley_lib.shapley_from_values(table)
  np.testing.assert_allclose(phi.sum(), table[-1] - table[0], atol=1e-12)


def test_symmetry_interchangeable_players_get_equal_values():
  num_players, first, second = 6, 1, 4
  table = np.random.default_rng(11).normal(size=2 ** num_players)
  masks = shapley_lib.coalition_masks(num_players)
  swapped = masks.copy()
  swapped[:, [first, second]] = masks[:, [second, first]]
  symmetric = (table + table[bit_index(swapped)]) / 2
  phi = shapley_lib.shapley_from_values(symmetric)
  np.testing.assert_allclose(phi[first], phi[second], atol=1e-12)
  assert not np.allclose(phi[first], phi[0])  # The game is not symmetric in the other players.


def test_dummy_player_that_never_changes_the_value_gets_zero():
  num_players, dummy = 6, 2
  table = np.random.default_rng(12).normal(size=2 ** num_players)
  without_dummy = np.arange(2 ** num_players) & ~(1 << dummy)
  phi = shapley_lib.shapley_from_values(table[without_dummy])
  assert abs(phi[dummy]) < 1e-12
  assert np.all(np.abs(np.delete(phi, dummy)) > 1e-6)


def test_additivity_values_of_a_sum_of_games_add():
  rng = np.random.default_rng(13)
  first, second = rng.normal(size=(2, 2 ** 7))
  np.testing.assert_allclose(
      shapley_lib.shapley_from_values(first + second),
      shapley_lib.shapley_from_values(first) + shapley_lib.shapley_from_values(second), atol=1e-12)


# --------------------------------------------------------------------------------------------------
# exact_shapley on closed-form games.


def test_exact_additive_game_gives_each_player_its_weight():
  weights = jnp.array([0.5, -1.0, 2.0, 0.25, 3.0])
  result = shapley_lib.exact_shapley(lambda masks: masks.astype(jnp.float32) @ weights + 7.0, 5)
  np.testing.assert_allclose(result.phi, weights, atol=1e-5)
  np.testing.assert_allclose(result.value_empty, 7.0)
  np.testing.assert_allclose(result.value_full, 7.0 + weights.sum(), atol=1e-5)
  assert result.num_evaluations == 32 and result.std_error is None


def test_exact_weighted_voting_game_gives_shapley_shubik_power():
  # Weights 50, 49, 1 with quota 51: the big party is pivotal in 4 of 6 orders, the others in 1.
  seats = jnp.array([50, 49, 1])
  result = shapley_lib.exact_shapley(lambda masks: (masks @ seats >= 51).astype(jnp.float32), 3)
  np.testing.assert_allclose(result.phi, [2 / 3, 1 / 6, 1 / 6], atol=1e-6)


def test_exact_unanimity_game_splits_between_the_required_players():
  required = jnp.array([False, True, False, True, True, False])
  result = shapley_lib.exact_shapley(lambda masks: jnp.all(masks | ~required, axis=1), 6)
  np.testing.assert_allclose(result.phi, np.where(required, 1 / 3, 0.0), atol=1e-6)


def test_exact_vector_valued_game_gives_a_value_per_output():
  weights = jnp.array([1.0, 2.0, 3.0, 4.0])
  def two_outputs(masks):
    members = masks.astype(jnp.float32)
    return jnp.stack([members @ weights, jnp.all(masks[:, :2], axis=1) * 6.0], axis=1)
  result = shapley_lib.exact_shapley(two_outputs, 4)
  assert result.phi.shape == (4, 2) and result.value_full.shape == (2,)
  np.testing.assert_allclose(result.phi[:, 0], weights, atol=1e-5)
  np.testing.assert_allclose(result.phi[:, 1], [3.0, 3.0, 0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(result.phi.sum(0), result.value_full - result.value_empty, atol=1e-5)


def random_table_game(num_players: int, seed: int):
  table = jnp.asarray(np.random.default_rng(seed).normal(size=2 ** num_players), jnp.float32)
  bits = jnp.asarray(1 << np.arange(num_players), jnp.int32)
  return table, lambda masks: table[masks.astype(jnp.int32) @ bits]


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 64, 1000])
def test_exact_chunking_gives_the_same_values(chunk_size):
  table, game = random_table_game(6, seed=20)
  result = shapley_lib.exact_shapley(game, 6, chunk_size=chunk_size)
  np.testing.assert_allclose(result.phi, shapley_lib.shapley_from_values(np.asarray(table, np.float64)),
                             atol=1e-5)
  assert result.num_evaluations == 64


def test_exact_chunks_compile_once_and_value_args_reuse_the_compile():
  traces = []
  def weighted(masks, weights):
    traces.append(masks.shape)
    return masks.astype(jnp.float32) @ weights
  first = shapley_lib.exact_shapley(weighted, 5, chunk_size=7, value_args=(jnp.arange(5.0),))
  second = shapley_lib.exact_shapley(weighted, 5, chunk_size=7, value_args=(-jnp.arange(5.0),))
  assert traces == [(7, 5)]  # 5 chunks, the last padded, and two calls: one trace.
  np.testing.assert_allclose(first.phi, np.arange(5.0), atol=1e-5)
  np.testing.assert_allclose(second.phi, -np.arange(5.0), atol=1e-5)


def test_exact_without_jit_calls_a_host_value_fn():
  weights = np.array([1.0, -2.0, 0.5])
  def host_game(masks):
    assert isinstance(masks, jax.Array) and masks.shape == (3, 3)
    return np.asarray(masks, np.float64) @ weights
  result = shapley_lib.exact_shapley(host_game, 3, chunk_size=3, jit=False)
  np.testing.assert_allclose(result.phi, weights, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Sampling estimators, on a smooth 10-player game with interactions.

NUM_SAMPLED_PLAYERS = 10
SMALL_BUDGET, LARGE_BUDGET = 300, 3000
SEEDS = (0, 1, 2)


_GAME_RNG = np.random.default_rng(30)
LINEAR_WEIGHTS = _GAME_RNG.normal(size=NUM_SAMPLED_PLAYERS).astype(np.float32)
PAIR_WEIGHTS = (_GAME_RNG.normal(size=(NUM_SAMPLED_PLAYERS,) * 2) / 3).astype(np.float32)


def interaction_game(masks):
  members = masks.astype(jnp.float32)
  return jnp.tanh(members @ LINEAR_WEIGHTS
                  + jnp.einsum("ki,ij,kj->k", members, PAIR_WEIGHTS, members))


def two_output_game(masks):
  value = interaction_game(masks)
  return jnp.stack([value, -2.0 * value + 1.0], axis=1)


SAMPLERS = {
    "permutation": lambda game, budget, key: shapley_lib.permutation_shapley(
        game, NUM_SAMPLED_PLAYERS, budget=budget, key=key),
    "kernel": lambda game, budget, key: shapley_lib.kernel_shapley(
        game, NUM_SAMPLED_PLAYERS, budget=budget, key=key),
}


@pytest.fixture(scope="module")
def exact_interaction():
  return shapley_lib.exact_shapley(interaction_game, NUM_SAMPLED_PLAYERS)


def rms_error(phi, exact) -> float:
  return float(jnp.sqrt(jnp.mean((phi - exact) ** 2)))


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sampler_converges_to_exact_values_as_budget_grows(method, exact_interaction):
  sample = SAMPLERS[method]
  errors = {budget: [rms_error(sample(interaction_game, budget, seed).phi, exact_interaction.phi)
                     for seed in SEEDS] for budget in (SMALL_BUDGET, LARGE_BUDGET)}
  # Error falls like 1 / sqrt(budget): about 0.32x for 10x the budget.
  assert np.mean(errors[LARGE_BUDGET]) < 0.6 * np.mean(errors[SMALL_BUDGET]), errors
  scale = float(jnp.sqrt(jnp.mean(exact_interaction.phi ** 2)))
  assert np.mean(errors[LARGE_BUDGET]) < 0.1 * scale, (errors, scale)
  assert max(errors[LARGE_BUDGET]) < 0.15 * scale, (errors, scale)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sampler_is_reproducible_for_a_seed_and_spends_its_budget(method):
  sample = SAMPLERS[method]
  first = sample(interaction_game, LARGE_BUDGET, 0)
  np.testing.assert_array_equal(first.phi, sample(interaction_game, LARGE_BUDGET, 0).phi)
  np.testing.assert_array_equal(first.phi, sample(interaction_game, LARGE_BUDGET,
                                                  jax.random.key(0)).phi)
  assert not np.array_equal(first.phi, sample(interaction_game, LARGE_BUDGET, 1).phi)
  assert LARGE_BUDGET - NUM_SAMPLED_PLAYERS * 2 < first.num_evaluations <= LARGE_BUDGET


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sampler_satisfies_efficiency(method):
  result = SAMPLERS[method](interaction_game, SMALL_BUDGET, 3)
  np.testing.assert_allclose(result.phi.sum(), result.value_full - result.value_empty, atol=1e-5)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sampler_handles_vector_values_linearly(method):
  single = SAMPLERS[method](interaction_game, SMALL_BUDGET, 4)
  pair = SAMPLERS[method](two_output_game, SMALL_BUDGET, 4)
  assert pair.phi.shape == (NUM_SAMPLED_PLAYERS, 2)
  np.testing.assert_allclose(pair.phi[:, 0], single.phi, atol=1e-5)
  np.testing.assert_allclose(pair.phi[:, 1], -2.0 * single.phi, atol=1e-4)
  np.testing.assert_allclose(pair.phi.sum(0), pair.value_full - pair.value_empty, atol=1e-4)


def test_permutation_std_error_covers_the_actual_error(exact_interaction):
  result = SAMPLERS["permutation"](interaction_game, LARGE_BUDGET, 0)
  assert result.std_error.shape == (NUM_SAMPLED_PLAYERS,)
  assert np.all(np.abs(result.phi - exact_interaction.phi) < 5 * result.std_error)


def test_permutation_std_error_matches_the_error_observed_over_seeds(exact_interaction):
  """Over 16 seeds the root-mean-square error against the exact values and the root-mean-square
  reported standard error agree within a factor of 1.4 either way (they agree within 0.9-1.1 in
  practice): a standard error off by sqrt(pairs) = 13 at this budget, or too small, fails."""
  results = [SAMPLERS["permutation"](interaction_game, LARGE_BUDGET, seed) for seed in range(16)]
  phi = np.stack([np.asarray(result.phi) for result in results])
  std_error = np.stack([np.asarray(result.std_error) for result in results])
  observed = np.sqrt(np.mean((phi - np.asarray(exact_interaction.phi)) ** 2))
  reported = np.sqrt(np.mean(std_error ** 2))
  assert 1 / 1.4 < reported / observed < 1.4, (reported, observed)


def test_permutation_counts_an_order_and_its_reverse_as_two():
  # 332 orders (166 pairs) is what LARGE_BUDGET buys, so this reuses that compile.
  by_count = shapley_lib.permutation_shapley(interaction_game, NUM_SAMPLED_PLAYERS,
                                             num_permutations=332, key=0)
  assert by_count.num_evaluations == 2 + 332 * (NUM_SAMPLED_PLAYERS - 1)
  np.testing.assert_array_equal(by_count.phi,
                                SAMPLERS["permutation"](interaction_game, LARGE_BUDGET, 0).phi)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_single_player_gets_the_whole_surplus(method):
  sampler = getattr(shapley_lib, f"{method}_shapley")
  result = sampler(lambda masks: masks[:, 0] * 3.0 + 1.0, 1, budget=10, key=0)
  np.testing.assert_allclose(result.phi, [3.0])
  assert result.num_evaluations == 2


def test_shapley_is_exact_up_to_max_exact_players_and_samples_above():
  _, game = random_table_game(6, seed=40)
  np.testing.assert_array_equal(shapley_lib.shapley(game, 6).phi,
                                shapley_lib.exact_shapley(game, 6).phi)
  auto = shapley_lib.shapley(interaction_game, NUM_SAMPLED_PLAYERS, max_exact_players=8,
                             budget=SMALL_BUDGET, key=5)
  np.testing.assert_array_equal(auto.phi, SAMPLERS["kernel"](interaction_game, SMALL_BUDGET, 5).phi)
  by_permutation = shapley_lib.shapley(interaction_game, NUM_SAMPLED_PLAYERS, method="permutation",
                                       budget=SMALL_BUDGET, key=5)
  np.testing.assert_array_equal(by_permutation.phi,
                                SAMPLERS["permutation"](interaction_game, SMALL_BUDGET, 5).phi)


# --------------------------------------------------------------------------------------------------
# Errors.


def test_exact_above_the_hard_cap_suggests_sampling():
  with pytest.raises(ValueError, match=r"2\*\*25.*method='kernel' or 'permutation'"):
    shapley_lib.exact_shapley(lambda masks: masks.sum(1), 25)
  with pytest.raises(ValueError, match="limit is 24 players"):
    shapley_lib.coalition_masks(25)
  with pytest.raises(ValueError, match="limit is 24 players"):
    shapley_lib.shapley(lambda masks: masks.sum(1), 25, method="exact")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_value_names_the_coalition_and_its_players(bad_value):
  target = jnp.array([False, True, False, True])  # Players 1 and 3: coalition 2 + 8 = 10.
  def game(masks):
    return jnp.where(jnp.all(masks == target, axis=1), bad_value, masks.sum(1).astype(jnp.float32))
  with pytest.raises(ValueError, match=r"coalition 10 \(players \[1, 3\] of 4"):
    shapley_lib.exact_shapley(game, 4, chunk_size=3)


def test_non_finite_value_while_sampling_names_the_players():
  def game(masks):
    return jnp.where(masks[:, 0] & masks[:, 1], jnp.nan, 1.0)
  with pytest.raises(ValueError, match=r"players \[0, 1"):
    SAMPLERS["kernel"](game, SMALL_BUDGET, 0)


def test_non_finite_entry_of_a_numpy_table_names_the_coalition():
  table = np.zeros((2, 8))
  table[1, 5] = np.nan
  with pytest.raises(ValueError, match=r"batch position \(1,\) for coalition 5 \(players \[0, 2\]"):
    shapley_lib.shapley_from_values(table)


def test_value_fn_with_the_wrong_number_of_rows_is_rejected():
  with pytest.raises(ValueError,
                     match=r"shape \(7,\) for masks of shape \(8, 3\).*one value per mask row"):
    shapley_lib.exact_shapley(lambda masks: masks.sum(1)[:-1], 3)
  with pytest.raises(ValueError, match=r"shape \(8, 3, 1\)"):
    shapley_lib.exact_shapley(lambda masks: masks[..., None].astype(jnp.float32), 3)


def test_values_that_are_not_a_power_of_two_or_mismatch_num_players_are_rejected():
  with pytest.raises(ValueError, match="6 entries on its last axis.*2\\*\\*p"):
    shapley_lib.shapley_from_values(np.zeros(6))
  with pytest.raises(ValueError, match="a game of 3 players, but num_players=4"):
    shapley_lib.shapley_from_values(np.zeros(8), num_players=4)
  with pytest.raises(ValueError, match="a game of 3 players, but num_players=2"):
    shapley_lib.shapley_from_values(jnp.zeros(8), num_players=2)


def test_sampling_budgets_and_arguments_that_cannot_work_are_rejected():
  game = interaction_game
  with pytest.raises(ValueError, match="pass budget >= 12"):
    shapley_lib.kernel_shapley(game, NUM_SAMPLED_PLAYERS, budget=11, key=0)
  with pytest.raises(ValueError, match="pass budget >= 20"):
    shapley_lib.permutation_shapley(game, NUM_SAMPLED_PLAYERS, budget=19, key=0)
  with pytest.raises(ValueError, match="even number"):
    shapley_lib.permutation_shapley(game, NUM_SAMPLED_PLAYERS, num_permutations=3, key=0)
  with pytest.raises(ValueError, match="exactly one of num_permutations or budget"):
    shapley_lib.permutation_shapley(game, NUM_SAMPLED_PLAYERS, key=0)
  with pytest.raises(ValueError, match="pass key=jax.random.key"):
    shapley_lib.shapley(game, NUM_SAMPLED_PLAYERS, max_exact_players=4)
  with pytest.raises(ValueError, match="method='shap'"):
    shapley_lib.shapley(game, NUM_SAMPLED_PLAYERS, method="shap")
  with pytest.raises(ValueError, match="chunk_size=0"):
    shapley_lib.exact_shapley(game, NUM_SAMPLED_PLAYERS, chunk_size=0)
  with pytest.raises(ValueError, match="positive int number of players"):
    shapley_lib.exact_shapley(game, 0)
