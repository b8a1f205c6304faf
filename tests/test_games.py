"""MM-SHAP games. Pixel-patch players equal Shapley values computed from scratch, by calling the model
on every masked input (the MMBT, each example with the authors' grid for its own title) or known in
closed form (a user's additive model: attention masking and the fill value); and MM-SHAP of a CLIP
image-sentence score equals the MM-SHAP authors' method on the same random weights: shap over one
mask of tokens and patches, in PyTorch, as their public code does it."""

import itertools
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import shap
import torch
import transformers
from flax import nnx
from PIL import Image

import fakes
from jmmshap import games, mmshap, players
from jmmshap.models import clip


def _shapley_from_scratch(value: dict[tuple[int, ...], float], num_players: int) -> np.ndarray:
  """phi_i = sum over coalitions S without i of |S|! (n - |S| - 1)! / n! (v(S + i) - v(S))."""
  phi = np.zeros(num_players)
  for player in range(num_players):
    others = [p for p in range(num_players) if p != player]
    for size in range(num_players):
      weight = math.factorial(size) * math.factorial(num_players - size - 1) / math.factorial(
          num_players)
      for coalition in itertools.combinations(others, size):
        with_player = tuple(sorted(coalition + (player,)))
        phi[player] += weight * (value[with_player] - value[coalition])
  return phi


def _coalitions(num_players: int) -> list[tuple[int, ...]]:
  return [c for size in range(num_players + 1)
          for c in itertools.combinations(range(num_players), size)]


# --------------------------------------------------------------------------------------------------
# Patches on the MMBT: its whole forward per coalition.


def test_mmbt_patch_players_equal_shapley_values_of_the_model_on_every_masked_input():
  model = fakes.tiny_mmbt(seed=3)
  # Titles of 3 and 1 tokens (+ [CLS], [SEP]): the authors' grid is 3x3 for one, 2x2 for the other.
  batch = fakes.make_batch([[1, 2], [1]], seed=4)
  options = mmshap.Options(image_players="patches", method="exact", chunk_size=64)
  result = mmshap.Explainer(model, options).explain(batch)
  forward = nnx.jit(lambda m, ids, attention, pixels: m(ids, attention, None, pixels)["logits"])
  for row, (num_words, grid) in enumerate([(2, 3), (1, 2)]):
    assert (result.player_modality[row] == players.IMAGE).sum() == grid ** 2
    patch = players.patch_map(16, 16, grid)
    word_of_token = batch["word_ids"][row]
    num_players = num_words + grid ** 2
    coalitions = _coalitions(num_players)
    ids, pixels = [], []
    for coalition in coalitions:
      present = np.zeros(num_players, bool)
      present[list(coalition)] = True
      kept_token = (word_of_token < 0) | present[np.maximum(word_of_token, 0)]
      ids.append(np.where(kept_token, batch["input_ids"][row], fakes.MASK))
      kept_pixel = (patch < 0) | present[num_words + np.maximum(patch, 0)]
      pixels.append(np.where(kept_pixel[..., None], batch["pixel_values"][row], 0.0))
    logits = np.asarray(forward(model, jnp.asarray(np.stack(ids)),
                                jnp.asarray(np.repeat(batch["attention_mask"][row:row + 1],
                                                      len(ids), 0)),
                                jnp.asarray(np.stack(pixels))), np.float64)
    target = int(np.argmax(logits[-1]))  # The last coalition is the full one.
    assert result.targets[row] == target
    expected = _shapley_from_scratch(dict(zip(coalitions, logits[:, target])), num_players)
    np.testing.assert_allclose(result.phi[row, :num_players], expected, atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# A user's own model: additive, so its Shapley values are known in closed form.


class _AdditiveScorer(nnx.Module):
  """score = sum of w[token] over attended tokens + sum of v * pixels: a player's Shapley value is
  its own term, minus what its masked representation leaves (the fill's term for a patch)."""

  def __init__(self, vocab: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    self.w = nnx.Param(jnp.asarray(rng.normal(size=vocab), jnp.float32))
    self.v = nnx.Param(jnp.asarray(rng.normal(size=(size, size, 3)), jnp.float32))


def _additive_scores(model, input_ids, attention_mask, pixel_values):
  text = jnp.sum(model.w[...][input_ids] * attention_mask, axis=1)
  return (text + jnp.sum(model.v[...] * pixel_values, axis=(1, 2, 3)))[:, None]


def test_any_model_with_attention_masking_and_a_fill_value_gets_its_closed_form_values():
  fill = 0.5
  scorer = _AdditiveScorer(40, 16, seed=1)
  game = games.PatchGame(scorer, _additive_scores, text_masking="attention", grid=3, fill=fill)
  batch = fakes.make_batch([[2, 1, 1]], seed=2)
  result = mmshap.Explainer(game, mmshap.Options(method="exact", chunk_size=64)).explain(batch)
  w, v = np.asarray(scorer.w[...]), np.asarray(scorer.v[...])
  word_of_token, ids = batch["word_ids"][0], batch["input_ids"][0]
  text = [w[ids[word_of_token == word]].sum() for word in range(3)]
  patch = players.patch_map(16, 16, 3)  # Cells of 5x5 pixels; the last row and column: no patch.
  pixels = batch["pixel_values"][0]
  image = [(v * (pixels - fill))[patch == k].sum() for k in range(9)]
  np.testing.assert_allclose(result.phi[0, :12], text + image, atol=1e-4, rtol=1e-4)
  assert (result.player_modality[0, :12] == [players.TEXT] * 3 + [players.IMAGE] * 9).all()


def test_patch_game_arguments_are_checked():
  scorer = _AdditiveScorer(40, 16, seed=1)
  with pytest.raises(ValueError, match="token masking needs the mask_token_id"):
    games.PatchGame(scorer, _additive_scores)
  with pytest.raises(ValueError, match="text_masking='drop'"):
    games.PatchGame(scorer, _additive_scores, text_masking="drop")
  with pytest.raises(ValueError, match="a game's value='contrast'"):
    games.PatchGame(scorer, _additive_scores, mask_token_id=0, value="contrast")
  with pytest.raises(ValueError, match="grid=-1"):
    games.PatchGame(scorer, _additive_scores, mask_token_id=0, grid=-1)
  with pytest.raises(ValueError, match="the game computes value='logit' but options.value='log_prob'"):
    mmshap.Explainer(games.PatchGame(scorer, _additive_scores, mask_token_id=0),
                     mmshap.Options(value="log_prob"))
  with pytest.raises(ValueError, match="a 20x20 patch grid does not fit a 16x16 image"):
    game = games.PatchGame(scorer, _additive_scores, mask_token_id=0, grid=20)
    mmshap.Explainer(game, mmshap.Options(chunk_size=64)).explain(fakes.make_batch([[1]]))


# --------------------------------------------------------------------------------------------------
# CLIP: parity with the MM-SHAP authors' method.

EOS = fakes.TINY_CLIP_VOCAB - 1  # The legacy config ends a text at its highest id.


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("clip"))
  torch_model = fakes.save_tiny_hf_clip(folder, eos_token_id=2, seed=5)
  model, _ = clip.from_pretrained(folder)
  return torch_model, model


def _sentence(num_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A sentence [BOS] tokens.. [EOS] and a normalised image (C, H, W), as CLIPProcessor gives."""
  rng = np.random.default_rng(seed)
  ids = np.concatenate([[fakes.TINY_CLIP_BOS], rng.integers(4, EOS - 1, num_tokens), [EOS]])
  return ids.astype(np.int64), rng.normal(size=(3, 32, 32)).astype(np.float32)


def _authors_explainer(torch_model, ids: np.ndarray, pixels: np.ndarray, algorithm: str, **kwargs):
  """MM-SHAP of CLIP as the authors' public code computes it (mm-shap_clip_dataset.py): one row X =
  the sentence's token ids then patch ids 1 .. p*p, p = ceil(sqrt(tokens)); a masker that zeroes
  what a coalition lacks and restores the first and last token; a model that blanks each zeroed
  patch (cells of H // p pixels, set to 0 in the normalised pixels) and reads logits_per_image.
  They loop over rows with one forward each; the rows are batched here, the values are the same."""
  num_tokens = len(ids)
  grid = math.ceil(math.sqrt(num_tokens))
  cell = pixels.shape[1] // grid
  row = np.concatenate([ids, np.arange(1, grid * grid + 1)])[None]

  def masker(mask, x):
    masked = np.array(x)
    masked[~np.asarray(mask, bool)] = 0
    masked[0], masked[num_tokens - 1] = ids[0], ids[-1]  # Never mask out [BOS] and [EOS].
    return masked[None]

  masker.shape = row.shape

  def predict(rows):
    rows = np.asarray(rows)
    images = np.repeat(pixels[None], len(rows), 0)
    for image, patch_ids in zip(images, rows[:, num_tokens:]):
      for k in np.flatnonzero(patch_ids == 0):
        m, n = divmod(int(k), grid)
        image[:, m * cell:(m + 1) * cell, n * cell:(n + 1) * cell] = 0
    with torch.no_grad():
      out = torch_model(input_ids=torch.from_numpy(rows[:, :num_tokens].astype(np.int64)),
                        pixel_values=torch.from_numpy(images))
    return out.logits_per_image.diagonal().numpy().astype(np.float64)

  explainer = shap.Explainer(predict, masker, algorithm=algorithm, **kwargs)
  return explainer, row, num_tokens, grid


def _authors_shares(values: np.ndarray, num_tokens: int) -> float:
  """compute_mm_score: T-SHAP over all of X's token positions (its [BOS], [EOS] included)."""
  text, image = np.abs(values[:num_tokens]).sum(), np.abs(values[num_tokens:]).sum()
  return text / (text + image)


def _ours(model, ids: np.ndarray, pixels: np.ndarray) -> mmshap.Result:
  """This project's MM-SHAP of the same sentence: one text player per token, [BOS] and [EOS] are
  no players (always kept), patches on the authors' grid, masked tokens id 0, patches 0."""
  word_ids = np.arange(len(ids)) - 1
  word_ids[[0, -1]] = -1
  batch = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int32),
           "word_ids": word_ids[None], "pixel_values": pixels.transpose(1, 2, 0)[None]}
  options = mmshap.Options(text_players="tokens", method="exact", chunk_size=256)
  return mmshap.Explainer(games.clip_match_game(model), options).explain(batch)


def test_clip_per_player_values_equal_the_authors_exact_shap_values(tiny_clip):
  torch_model, model = tiny_clip
  ids, pixels = _sentence(2, seed=0)  # 4 tokens: a 2x2 grid; 4 + 4 players in shap's row.
  explainer, row, num_tokens, grid = _authors_explainer(torch_model, ids, pixels, "exact")
  theirs = explainer(row, silent=True).values[0]
  ours = _ours(model, ids, pixels)
  assert grid == 2 and (ours.player_modality[0] == players.IMAGE).sum() == 4
  # [BOS] and [EOS] are restored in every coalition: null players of shap's row.
  np.testing.assert_allclose(theirs[[0, num_tokens - 1]], 0.0, atol=1e-6)
  np.testing.assert_allclose(ours.phi[0, :2], theirs[1:num_tokens - 1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ours.phi[0, 2:6], theirs[num_tokens:], atol=1e-4, rtol=1e-4)
  assert ours.t_shap[0] == pytest.approx(_authors_shares(theirs, num_tokens), abs=1e-5)


def test_clip_t_shap_equals_the_authors_permutation_estimate_within_its_error(tiny_clip):
  torch_model, model = tiny_clip
  ids, pixels = _sentence(5, seed=1)  # 7 tokens: a 3x3 grid; 5 + 9 players exact here, 16 in shap.
  ours = _ours(model, ids, pixels)
  assert ours.exact[0] and (ours.player_modality[0] == players.IMAGE).sum() == 9
  # shap.Explainer with a function masker picks the permutation method, at 500 evaluations by
  # default: the authors' setting. Their estimate's spread over seeds bounds the agreement.
  estimates = []
  for seed in range(6):
    explainer, row, num_tokens, _ = _authors_explainer(torch_model, ids, pixels, "auto", seed=seed)
    assert isinstance(explainer, shap.explainers.PermutationExplainer)
    estimates.append(_authors_shares(explainer(row, silent=True).values[0], num_tokens))
  spread = np.std(estimates, ddof=1)
  assert abs(np.mean(estimates) - ours.t_shap[0]) <= 3 * spread / np.sqrt(len(estimates)) + 1e-3, (
      estimates, ours.t_shap[0])


# --------------------------------------------------------------------------------------------------
# The README's example, as a user runs it, on a tiny CLIP folder.

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def _save_tiny_clip_processor(folder: str, sentence: str) -> None:
  """A CLIP tokenizer whose words are the sentence's (its start and end of text are the tiny CLIP's
  ids) and an image processor for 32-pixel photos, saved as CLIPProcessor.from_pretrained reads
  them. CLIP's BPE starts from letters, the last one marked </w>, and merges them left to right."""
  vocab, merges = ["!", '"', "#", "<|startoftext|>"], []
  for word in sentence.split():
    pieces = [*word[:-1], word[-1] + "</w>"]
    vocab += [piece for piece in pieces if piece not in vocab]
    merged = pieces[0]
    for piece in pieces[1:]:
      if (merged, piece) not in merges:
        merges.append((merged, piece))
        vocab.append(merged + piece)
      merged += piece
  vocab += [f"unused{i}</w>" for i in range(len(vocab), EOS)] + ["<|endoftext|>"]
  assert vocab.index("<|startoftext|>") == fakes.TINY_CLIP_BOS and len(vocab) == fakes.TINY_CLIP_VOCAB
  tokenizer = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
  images = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                           crop_size={"height": 32, "width": 32})
  transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def test_readme_example_explains_a_clip_folder(tmp_path, monkeypatch, capsys):
  folder = str(tmp_path / "clip")
  fakes.save_tiny_hf_clip(folder, eos_token_id=2, seed=5)
  _save_tiny_clip_processor(folder, "a red kettle with a black handle")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), np.uint8)).save(
      tmp_path / "kettle.jpg")
  with open(README) as f:
    section = f.read().split("## Explaining your own model", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert '"openai/clip-vit-base-patch32"' in code
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(code.replace('"openai/clip-vit-base-patch32"', json.dumps(folder)), namespace)
  result = namespace["result"]
  # "a red kettle with a black handle": 7 words, one token each here; the authors' grid for 9
  # tokens is 3x3: 16 players, exact.
  assert (result.player_modality[0] == players.TEXT).sum() == 7
  assert (result.player_modality[0] == players.IMAGE).sum() == 9
  assert 0 < result.t_shap[0] < 1 and result.exact[0]
  np.testing.assert_allclose(np.nansum(result.phi[0]), result.value_full[0] - result.value_empty[0],
                             rtol=1e-4, atol=1e-4)
  assert capsys.readouterr().out.startswith("T-SHAP ")
