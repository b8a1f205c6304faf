"""MM-SHAP's players whatever the model: the authors' patch grid, how a photo is cut into patches and
where each patch is drawn, and word ids from a Hugging Face tokenizer."""

import numpy as np
import pytest

from jmmshap import players


@pytest.mark.parametrize("tokens, grid", [(1, 1), (4, 2), (5, 3), (9, 3), (10, 4), (77, 9)])
def test_authors_grid_is_the_ceiling_of_the_square_root_of_the_tokens(tokens, grid):
  assert players.authors_grid(tokens) == grid


def test_patches_are_square_cells_from_the_top_left_and_the_remainder_is_never_masked():
  patch = players.patch_map(7, 8, 3)  # Cells of 2x2 pixels; the last row and last 2 columns: none.
  assert patch[0, 0] == patch[1, 1] == 0 and patch[0, 2] == 1 and patch[2, 0] == 3
  assert patch[5, 5] == 8
  assert (patch[6] == -1).all() and (patch[:, 6:] == -1).all()
  assert sorted(np.unique(patch[patch >= 0])) == list(range(9))
  with pytest.raises(ValueError, match="a 9x9 patch grid does not fit a 7x8 image"):
    players.patch_map(7, 8, 9)


@pytest.mark.parametrize("height, width, grid", [(16, 16, 2), (7, 8, 3), (32, 20, 5)])
def test_patch_boxes_cover_exactly_the_pixels_of_each_patch(height, width, grid):
  patch = players.patch_map(height, width, grid)
  for k, (top, left, bottom, right) in enumerate(players.patch_boxes(height, width, grid)):
    rows, cols = np.nonzero(patch == k)
    assert (rows.min() / height, cols.min() / width) == (top, left)
    assert ((rows.max() + 1) / height, (cols.max() + 1) / width) == (bottom, right)


class _Encoding(dict):
  """What a Hugging Face tokenizer returns: input ids, and word ids per row (None: special)."""

  def __init__(self, words):
    super().__init__(input_ids=[[0] * len(row) for row in words])
    self._words = words

  def word_ids(self, row):
    return self._words[row]


def test_word_ids_of_a_tokenizer_output_mark_special_and_padding_tokens():
  encoding = _Encoding([[None, 0, 1, 1, None], [None, 0, None, None, None]])
  np.testing.assert_array_equal(players.word_ids_of(encoding),
                                [[-1, 0, 1, 1, -1], [-1, 0, -1, -1, -1]])
