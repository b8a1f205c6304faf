"""The whole CLIP (text tower, vision tower, projections, temperature) against transformers' PyTorch
CLIPModel on the same random weights, for both ways of finding the end-of-text token."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import fakes
from jmmshap.models import clip, hf

TOLERANCE = 1e-4
@pytest.fixture(scope="module", params=[2, 60], ids=["legacy_eos_is_the_highest_id", "eos_id_60"])
def checkpoint(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
  return fakes.save_tiny_hf_clip(folder, request.param), folder, request.param


def _inputs(eos_token_id: int):
  rng = np.random.RandomState(1)
  ids = rng.randint(4, 50, size=(3, 9))
  attention = np.ones_like(ids)
  ends = [8, 5, 3]  # Where each text ends; the rest is padding.
  for row, end in enumerate(ends):
    ids[row, 0] = 3
    ids[row, end] = 63 if eos_token_id == 2 else eos_token_id  # The highest id, or the eos id.
    ids[row, end + 1:] = 0
    attention[row, end + 1:] = 0
  images = rng.randn(3, 32, 32, 3).astype(np.float32)
  return ids, attention, images


def test_whole_clip_matches_transformers(checkpoint):
  torch_model, folder, eos_token_id = checkpoint
  model, config = clip.from_pretrained(folder)
  assert config.text.eos_token_id == eos_token_id and config.projection_dim == 8
  ids, attention, images = _inputs(eos_token_id)
  with torch.no_grad():
    reference = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention),
                            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  ours = nnx.jit(lambda m, *x: m(*x))(model, jnp.asarray(ids), jnp.asarray(attention),
                                       jnp.asarray(images))
  for name in ("logits_per_image", "text_embeds", "image_embeds"):
    np.testing.assert_allclose(np.asarray(ours[name]), getattr(reference, name).numpy(),
                               atol=TOLERANCE, rtol=0, err_msg=name)
  np.testing.assert_allclose(np.asarray(model.match_scores(ids, attention, images))[:, 0],
                             np.diag(reference.logits_per_image.numpy()), atol=TOLERANCE)


def test_a_vision_only_folder_is_not_a_whole_clip(tmp_path):
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**fakes.TINY_CLIP_VISION)).save_pretrained(
      str(tmp_path))
  with pytest.raises(hf.CheckpointError, match="not 'clip': a whole CLIPModel checkpoint"):
    clip.from_pretrained(str(tmp_path))
