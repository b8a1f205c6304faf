"""MM-SHAP of CLIP-MMBT: players, padded games against unpadded ones, axioms and errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmmshap import games, mmshap, shapley
from jmmshap.models import bert, clip_vision, mmbt
from jmmshap.tokenizer import TitleTokenizer

from fakes import CLS, LENGTH, MASK, NUM_IMAGES, SEP, make_batch, tiny_mmbt  # noqa: E402
# One shape for every unit test, so the explainer's forward compiles once for the whole file.
OPTIONS = mmshap.Options(chunk_size=64, examples_per_group=2)


@functools.partial(jax.jit, static_argnames="graphdef")
def _direct_logits(graphdef, state, batch, text_keep, image_keep):
  """The model on every row, vision tower included: no explainer code on this path."""
  model = nnx.merge(graphdef, state)
  return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
               batch["pixel_values"], text_keep=text_keep, image_keep=image_keep)["logits"]


def unpadded_table(model: mmbt.MMBT, batch: dict, row: int,
                   tokens_per_player: int | None = None) -> np.ndarray:
  """Logits (2**p, C) of the game over exactly this example's p players, one direct call per mask.

  Text players are words, or with `tokens_per_player` runs of that many real tokens (counted here).
  """
  if tokens_per_player is None:
    player_of_token, num_text = mmshap.text_players(batch["word_ids"][row:row + 1])
    tokens, num_text = player_of_token[0], int(num_text[0])
  else:
    real = np.flatnonzero(batch["word_ids"][row] >= 0)
    tokens = np.full(LENGTH, -1)
    tokens[real] = np.arange(len(real)) // tokens_per_player
    num_text = -(-len(real) // tokens_per_player)
  players = num_text + NUM_IMAGES
  masks = shapley.coalition_masks(players)
  rows = 64  # Every game here has at most 6 players: one compiled shape for all of them.
  assert len(masks) <= rows
  text_keep = np.ones((rows, LENGTH), bool)
  text_keep[:len(masks)] = (tokens < 0) | masks[:, np.maximum(tokens, 0)]
  image_keep = np.ones((rows, NUM_IMAGES), bool)
  image_keep[:len(masks)] = masks[:, num_text:]
  repeated = {k: np.repeat(batch[k][row:row + 1], rows, axis=0)
              for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
  graphdef, state = nnx.split(model)
  logits = _direct_logits(graphdef, state, repeated, text_keep, image_keep)
  return np.asarray(logits, np.float64)[:len(masks)]


# --------------------------------------------------------------------------------------------------
# Players.


def test_words_become_players_and_specials_never_do():
  word_ids = np.array([[-1, 0, 0, 1, 2, 2, -1, -1],
                       [-1, 0, 1, -1, -1, -1, -1, -1]])
  player_of_token, num_text = mmshap.text_players(word_ids)
  np.testing.assert_array_equal(player_of_token, [[-1, 0, 0, 1, 2, 2, -1, -1],
                                                  [-1, 0, 1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(num_text, [3, 2])


def test_tokenizer_word_pieces_share_one_player():
  titles = ["Acme deluxe lamp", "Nordby reading light, compact"]
  tokenizer = TitleTokenizer.train(titles * 3, vocab_size=40, max_length=40)  # Pieces, not words.
  batch = tokenizer(["Acme deluxe lamp, compact"])
  player_of_token, num_text = mmshap.text_players(batch["word_ids"])
  assert num_text[0] == 5  # acme, deluxe, lamp, ",", compact.
  assert (player_of_token[0] >= 0).sum() > 5  # Some words are several pieces ...
  for player in range(5):  # ... and each word's pieces are one player.
    pieces = batch["input_ids"][0][player_of_token[0] == player].tolist()
    assert tokenizer.tokenizer.decode(pieces).replace(" ", "") == [
        "acme", "deluxe", "lamp", ",", "compact"][player]
  specials = np.isin(batch["input_ids"][0], [tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id])
  np.testing.assert_array_equal(player_of_token[0] < 0, specials)


def test_token_chunks_group_runs_of_tokens_in_order():
  word_ids = np.array([[-1, 0, 0, 1, 2, 2, -1, -1]])
  player_of_token, num_text = mmshap.text_players(word_ids, grouping="tokens", tokens_per_player=2)
  np.testing.assert_array_equal(player_of_token, [[-1, 0, 0, 1, 1, 2, -1, -1]])
  np.testing.assert_array_equal(num_text, [3])


def test_words_past_max_text_players_merge_into_the_last_player():
  word_ids = np.array([[-1, 0, 1, 2, 3, 3, -1, -1]])
  player_of_token, num_text = mmshap.text_players(word_ids, max_text_players=2)
  np.testing.assert_array_equal(player_of_token, [[-1, 0, 1, 1, 1, 1, -1, -1]])  # No token lost.
  np.testing.assert_array_equal(num_text, [2])


def test_player_count_mismatch_names_the_example():
  player_of_token = np.array([[-1, 0, 1, 3, -1]])
  with pytest.raises(ValueError, match=r"'ex-7'.*text player 3 but the example has 3"):
    mmshap.check_players(player_of_token, np.array([3]), 5, ["ex-7"])
  with pytest.raises(ValueError, match=r"'ex-7' has 4 text players but players \[2\] own no token"):
    mmshap.check_players(np.array([[-1, 0, 1, 3, -1]]), np.array([4]), 5, ["ex-7"])
  with pytest.raises(ValueError, match=r"'ex-7' has 4 text players but there are 3"):
    mmshap.check_players(np.array([[0, 1, 2, 3, -1]]), np.array([4]), 3, ["ex-7"])


def test_modality_shares_leave_zero_over_zero_undefined():
  phi = np.array([[0.3, -0.1, 0.2, np.nan], [0.0, 0.0, 0.0, np.nan]])
  modality = np.array([[0, 0, 1, -1], [0, 0, 1, -1]])
  t_shap, v_shap = mmshap.modality_shares(phi, modality)
  np.testing.assert_allclose(t_shap[0], 0.4 / 0.6)
  np.testing.assert_allclose(v_shap[0], 0.2 / 0.6)
  assert np.isnan(t_shap[1]) and np.isnan(v_shap[1])


# --------------------------------------------------------------------------------------------------
# The game on a tiny untrained MMBT.


@pytest.fixture(scope="module")
def model():
  return tiny_mmbt()


def test_padded_game_gives_the_phi_of_the_unpadded_game(model):
  batch = make_batch([[1, 2], [1, 1, 2, 1]])  # 4 and 6 players in one chunk, P = 10 slots.
  result = mmshap.Explainer(model, OPTIONS).explain(batch)
  for row in range(2):
    table = unpadded_table(model, batch, row)
    players = len(table).bit_length() - 1
    prediction = int(table[-1].argmax())
    expected = shapley.shapley_from_values(table[:, prediction])
    np.testing.assert_allclose(result.phi[row, :players], expected, rtol=1e-4, atol=1e-5)
    assert np.isnan(result.phi[row, players:]).all()
    assert result.exact[row] and result.num_evaluations[row] == 2 ** players
    assert result.predictions[row] == result.targets[row] == prediction
  np.testing.assert_array_equal(result.player_modality, [[0, 0, 1, 1] + [-1] * 6,
                                                         [0, 0, 0, 0, 1, 1] + [-1] * 4])


def test_phi_sums_to_full_input_logit_minus_all_masked_logit(model):
  batch = make_batch([[1, 1, 1], [2, 1]], seed=1)
  result = mmshap.Explainer(model, OPTIONS).explain(batch)
  for row in range(2):
    table = unpadded_table(model, batch, row)  # Row 0: every player masked; last: none.
    prediction = int(table[-1].argmax())
    np.testing.assert_allclose(np.nansum(result.phi[row]),
                               table[-1, prediction] - table[0, prediction], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.value_full[row], table[-1, prediction], rtol=1e-5)
    np.testing.assert_allclose(result.value_empty[row], table[0, prediction], rtol=1e-5)


def test_log_prob_of_a_given_class_is_explained_instead_of_the_predicted_logit(model):
  batch = make_batch([[1, 1, 1], [2, 1]], seed=1)
  options = dataclasses.replace(OPTIONS, value="log_prob")
  targets = np.array([1, 2])
  result = mmshap.Explainer(model, options).explain(batch, targets=targets)
  np.testing.assert_array_equal(result.targets, targets)
  for row in range(2):
    table = jax.nn.log_softmax(unpadded_table(model, batch, row), axis=-1)
    assert result.predictions[row] == int(table[-1].argmax())
    expected = shapley.shapley_from_values(np.asarray(table[:, targets[row]], np.float64))
    np.testing.assert_allclose(result.phi[row, :len(expected)], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.value_full[row], table[-1, targets[row]], rtol=1e-5)


def test_log_odds_is_the_target_logit_against_the_logsumexp_of_the_other_logits(model):
  batch = make_batch([[1, 1, 1], [2, 1]], seed=1)
  options = dataclasses.replace(OPTIONS, value="log_odds")
  result = mmshap.Explainer(model, options).explain(batch)
  for row in range(2):
    logits = unpadded_table(model, batch, row)
    target = int(logits[-1].argmax())
    probability = np.exp(logits[:, target] - np.logaddexp.reduce(logits, axis=1))
    log_odds = np.log(probability) - np.log1p(-probability)
    expected = shapley.shapley_from_values(log_odds)
    assert result.targets[row] == target
    np.testing.assert_allclose(result.phi[row, :len(expected)], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.value_full[row], log_odds[-1], rtol=1e-5)


def test_log_odds_stay_finite_where_the_probability_rounds_to_one():
  logits = jnp.asarray([[40.0, 0.0, -1.0]])
  values = np.asarray(mmshap.class_values(logits, "log_odds"))
  np.testing.assert_allclose(values[0, 0], 40.0 - np.logaddexp(0.0, -1.0), rtol=1e-6)
  assert np.isfinite(values).all()


def test_contrast_weights_put_the_target_against_its_rivals_by_full_input_probability():
  weights = mmshap.contrast_weights(np.array([3.0, 1.0, 1.0 + np.log(3.0)]), target=0)
  np.testing.assert_allclose(weights, [1.0, -0.25, -0.75])
  # Weights sum to 0: a shift of every logit (which leaves the probabilities alone) is no value.
  logits = np.random.default_rng(0).normal(size=(5, 3))
  np.testing.assert_allclose((logits + 7.0) @ weights, logits @ weights)


def test_contrast_explains_the_rival_weighted_logit_combination(model):
  batch = make_batch([[1, 1, 1], [2, 1]], seed=1)
  options = dataclasses.replace(OPTIONS, value="contrast")
  result = mmshap.Explainer(model, options).explain(batch)
  for row in range(2):
    logits = unpadded_table(model, batch, row)
    target = int(logits[-1].argmax())
    contrast = logits @ mmshap.contrast_weights(logits[-1], target)
    expected = shapley.shapley_from_values(contrast)
    assert result.targets[row] == target
    np.testing.assert_allclose(result.phi[row, :len(expected)], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.value_full[row], contrast[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.value_empty[row], contrast[0], rtol=1e-5, atol=1e-6)


def test_sampled_contrast_agrees_with_exact_contrast(model):
  batch = make_batch([[1, 1, 1, 1], [1, 2, 1, 1]], seed=3)  # 6 players each.
  contrast = dataclasses.replace(OPTIONS, value="contrast")
  exact = mmshap.Explainer(model, contrast).explain(batch)
  sampled = mmshap.Explainer(
      model, dataclasses.replace(contrast, max_exact_players=4, budget=4000)).explain(batch)
  assert exact.exact.all() and not sampled.exact.any()
  np.testing.assert_allclose(sampled.value_full, exact.value_full, rtol=1e-5, atol=1e-6)
  scale = np.nanmax(np.abs(exact.phi), axis=1, keepdims=True)
  np.testing.assert_allclose(sampled.phi / scale, exact.phi / scale, atol=0.05)
  np.testing.assert_allclose(np.nansum(sampled.phi, 1), sampled.value_full - sampled.value_empty,
                             rtol=1e-4, atol=1e-5)


def test_zero_image_projection_gives_zero_v_shap(model):
  blind = tiny_mmbt(seed=1)
  blind.projection.kernel.set_value(jnp.zeros_like(blind.projection.kernel[...]))
  blind.projection.bias.set_value(jnp.zeros_like(blind.projection.bias[...]))
  assert blind.config.image_masking == "zero"
  result = mmshap.Explainer(blind, OPTIONS).explain(make_batch([[1, 2], [1, 1, 1, 1]], seed=2))
  image_phi = np.where(result.player_modality == mmshap.IMAGE, result.phi, 0.0)
  np.testing.assert_allclose(image_phi, 0.0, atol=1e-6)
  np.testing.assert_allclose(result.v_shap, 0.0, atol=1e-6)
  np.testing.assert_allclose(result.t_shap, 1.0, atol=1e-6)


def test_kernel_sampling_above_max_exact_players_agrees_with_exact(model):
  batch = make_batch([[1, 1, 1, 1], [1, 2, 1, 1]], seed=3)  # 6 players each.
  exact = mmshap.Explainer(model, OPTIONS).explain(batch)
  options = dataclasses.replace(OPTIONS, max_exact_players=4, budget=4000)
  sampled = mmshap.Explainer(model, options).explain(batch)
  assert exact.exact.all() and not sampled.exact.any()
  np.testing.assert_array_equal(sampled.num_evaluations, [4000, 4000])
  scale = np.nanmax(np.abs(exact.phi), axis=1, keepdims=True)
  np.testing.assert_allclose(sampled.phi / scale, exact.phi / scale, atol=0.05)
  np.testing.assert_allclose(sampled.t_shap, exact.t_shap, atol=0.05)
  np.testing.assert_allclose(np.nansum(sampled.phi, 1), sampled.value_full - sampled.value_empty,
                             rtol=1e-4, atol=1e-5)


def _assert_exact_phi_of_predicted_class(result, tables):
  for row, table in enumerate(tables):
    players = len(table).bit_length() - 1
    prediction = int(table[-1].argmax())
    expected = shapley.shapley_from_values(table[:, prediction])
    np.testing.assert_allclose(result.phi[row, :players], expected, rtol=1e-4, atol=1e-5)
    assert np.isnan(result.phi[row, players:]).all()


def test_permutation_method_samples_every_example_within_its_budget_and_agrees_with_exact(model):
  """method='permutation' samples even games small enough to be exact: 6 players and budget 4000
  buy 798 orders (399 antithetic pairs) of 5 evaluations each, plus the empty and full ones."""
  batch = make_batch([[1, 1, 1, 1], [1, 2, 1, 1]], seed=3)  # 6 players each.
  exact = mmshap.Explainer(model, OPTIONS).explain(batch)
  options = dataclasses.replace(OPTIONS, method="permutation", budget=4000)
  sampled = mmshap.Explainer(model, options).explain(batch)
  assert not sampled.exact.any()
  np.testing.assert_array_equal(sampled.num_evaluations, [2 + 798 * 5] * 2)
  np.testing.assert_array_equal(sampled.targets, exact.targets)
  scale = np.nanmax(np.abs(exact.phi), axis=1, keepdims=True)
  np.testing.assert_allclose(sampled.phi / scale, exact.phi / scale, atol=0.05)
  np.testing.assert_allclose(np.nansum(sampled.phi, 1), sampled.value_full - sampled.value_empty,
                             rtol=1e-4, atol=1e-5)


def test_token_players_are_runs_of_tokens_per_player_across_word_boundaries(model):
  """text_players='tokens', 2 per player: 3 words of 1, 2 and 2 tokens are 3 players (tokens 1-2,
  3-4, 5), not 3 word players; phi is that game's."""
  batch = make_batch([[1, 2, 2], [3, 1]], seed=4)
  options = dataclasses.replace(OPTIONS, text_players="tokens", tokens_per_player=2)
  result = mmshap.Explainer(model, options).explain(batch)
  np.testing.assert_array_equal(result.player_modality[:, :5], [[0, 0, 0, 1, 1], [0, 0, 1, 1, -1]])
  _assert_exact_phi_of_predicted_class(
      result, [unpadded_table(model, batch, row, tokens_per_player=2) for row in range(2)])


def test_attention_masking_removes_masked_words_and_image_embeddings_from_view():
  """with_masking('attention', 'attention') explains the game of a model whose masked players are
  left out of attention (its reference built here from the config, not by with_masking), which is
  another game than the default [MASK] / zero masking."""
  attending = games.with_masking(tiny_mmbt(), "attention", "attention")
  reference = tiny_mmbt()
  reference.config = dataclasses.replace(reference.config, text_masking="attention",
                                         image_masking="attention")
  batch = make_batch([[1, 2], [1, 1, 2]], seed=5)
  result = mmshap.Explainer(attending, OPTIONS).explain(batch)
  tables = [unpadded_table(reference, batch, row) for row in range(2)]
  _assert_exact_phi_of_predicted_class(result, tables)
  default = [unpadded_table(tiny_mmbt(), batch, row) for row in range(2)]
  assert not np.allclose(tables[0][:-1], default[0][:-1], atol=1e-3)  # Masking matters here.


def test_exact_above_the_hard_cap_raises_the_engine_error(model):
  long_title = make_batch([[1] * 23], length=26)  # 23 words + 2 image embeddings: 25 players.
  options = dataclasses.replace(OPTIONS, method="exact")
  with pytest.raises(ValueError, match=r"'ex-0' \(25 players\).*the limit is 24 players"):
    mmshap.Explainer(model, options).explain(long_title)


def test_non_finite_value_names_the_coalition_and_the_example(model):
  broken = tiny_mmbt()
  table = broken.bert.embeddings.word_embeddings.embedding
  table.set_value(table[...].at[39].set(jnp.nan))  # A token that is NaN unless masked.
  batch = make_batch([[1], [1, 2]])
  batch["input_ids"] = np.where(batch["input_ids"] == 39, 38, batch["input_ids"])
  batch["input_ids"][1, 2:4] = 39  # The second word of ex-1: first present in coalition 0b10.
  with pytest.raises(ValueError, match=r"example 'ex-1', coalition 2 \(present: text players \[1\] "
                                       r"of 2, image embeddings \[\] of 2"):
    mmshap.Explainer(broken, OPTIONS).explain(batch)


def test_chunk_size_must_split_over_the_devices(model):
  with pytest.raises(ValueError, match="chunk_size=33 does not split over 2 devices"):
    mmshap.Explainer(model, dataclasses.replace(OPTIONS, chunk_size=33))


def test_max_exact_players_above_the_engine_limit_is_refused():
  with pytest.raises(ValueError, match="at most 24 players"):
    mmshap.Options(max_exact_players=25)


def test_a_call_takes_the_device_count_times_a_power_of_two_within_the_cap_and_the_memory():
  rows = lambda needed, cap=1024, fits=10**9: mmshap.call_rows(needed, devices=2, cap=cap, fits=fits)
  assert [rows(n) for n in (1, 2, 3, 40, 64, 65, 5000)] == [2, 2, 4, 64, 64, 128, 1024]
  assert rows(5000, cap=64) == 64 and rows(5000, fits=300) == 256 and rows(5000, fits=1) == 2
  assert mmshap.call_rows(40, devices=6, cap=1024, fits=10**9) == 48  # 6 x 2**3.


def test_a_row_of_a_bert_base_mmbt_is_bounded_as_the_measured_memory_says():
  model = nnx.eval_shape(lambda: mmbt.MMBT(
      mmbt.MMBTConfig(num_image_embeddings=4, cls_token_id=CLS, sep_token_id=SEP,
                      mask_token_id=MASK),
      bert.BertModel(bert.BertConfig(vocab_size=30522), rngs=nnx.Rngs(0)),
      clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(), rngs=nnx.Rngs(0)),
      num_labels=3, rngs=nnx.Rngs(0)))
  # 1,024 rows at 120 tokens took 15 GB on a CPU; the bound says about as much.
  assert 14e9 < 1024 * games.row_bytes(model, 120) < 17e9
  assert mmshap.memory_budget(2.5) == int(2.5 * 2**30)


def test_calls_stay_within_the_memory_budget_and_shrink_to_the_rows_a_group_needs(model, monkeypatch):
  sizes = []
  original = mmshap.Explainer._values

  def record(self, group, row_example, masks):
    sizes.append(len(masks))
    return original(self, group, row_example, masks)

  monkeypatch.setattr(mmshap.Explainer, "_values", record)
  batch = make_batch([[1, 1], [1, 1, 1, 1]])  # 2**(2+2) + 2**(4+2) = 80 coalition rows.
  explainer = mmshap.Explainer(model, dataclasses.replace(OPTIONS, chunk_size=1024))
  explainer.explain(batch)
  assert sizes == [128]  # One call, not 1,024 padded rows.
  sizes.clear()
  length = np.asarray(batch["input_ids"]).shape[1]
  tight = mmshap.Explainer(model, dataclasses.replace(
      OPTIONS, chunk_size=1024, memory_gb=20.5 * games.row_bytes(model, length) / 2**30))
  tight.explain(batch)
  assert set(sizes) == {16} and len(sizes) == 5  # 20 rows fit: calls of 16.


def test_padding_beyond_a_groups_longest_title_is_not_computed_and_changes_nothing(model,
                                                                                   monkeypatch):
  lengths = []
  original = mmshap.Explainer._values

  def record(self, group, row_example, masks):
    lengths.append(group["input_ids"].shape[1])
    return original(self, group, row_example, masks)

  monkeypatch.setattr(mmshap.Explainer, "_values", record)
  words = [[1, 2], [1, 1, 1]]  # At most 4 word tokens + [CLS] and [SEP]: 6 real tokens.
  short = mmshap.Explainer(model, OPTIONS).explain(make_batch(words, length=8))
  lengths.clear()
  padded = mmshap.Explainer(model, OPTIONS).explain(make_batch(words, length=32))
  assert set(lengths) == {8}  # 32 tokens given; the forwards ran on 8.
  np.testing.assert_allclose(padded.phi[:, :5], short.phi[:, :5], rtol=1e-5, atol=1e-6)
  assert padded.phi.shape[1] > short.phi.shape[1]  # The player axis keeps the given length's.
