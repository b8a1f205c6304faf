import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jmmshap.models import bert, clip_vision, mmbt, resnet

CLS, SEP, MASK = 2, 3, 4


def _model(num_image_embeddings=4, tower="clip", **config):
  rngs = nnx.Rngs(0)
  text = bert.BertModel(bert.BertConfig.tiny(vocab_size=40), rngs=rngs)
  if tower == "clip":
    vision = clip_vision.CLIPVisionModel(clip_vision.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8), rngs=rngs)
  else:
    vision = resnet.ResNet(resnet.ResNetConfig(depths=(1, 1), layer_type="basic", hidden_sizes=(8, 16),
                                               embedding_size=8, small_stem=True), rngs=rngs)
  model = mmbt.MMBT(mmbt.MMBTConfig(num_image_embeddings=num_image_embeddings, cls_token_id=CLS,
                                    sep_token_id=SEP, mask_token_id=MASK, **config),
                    text, vision, num_labels=5, rngs=rngs)
  model.eval()
  return model


@pytest.fixture(scope="module")
def inputs():
  input_ids = jnp.array([[CLS, 10, 11, 12, SEP, 0], [CLS, 13, SEP, 0, 0, 0]])
  pixel_values = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return dict(input_ids=input_ids, attention_mask=(input_ids > 0).astype(jnp.int32),
              token_type_ids=jnp.zeros_like(input_ids)), pixel_values


@pytest.fixture(scope="module")
def model():
  return _model()


@pytest.mark.parametrize("count", sorted(mmbt.POOLING_GRIDS))
def test_pooling_matches_torch_adaptive_average_pool(count):
  features = np.random.default_rng(count).normal(size=(2, 7, 9, 3)).astype(np.float32)
  rows, cols = mmbt.POOLING_GRIDS[count]
  expected = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(features).permute(0, 3, 1, 2), (rows, cols))
  expected = expected.flatten(2).transpose(1, 2).numpy()
  np.testing.assert_allclose(mmbt.adaptive_average_pool(jnp.asarray(features), (rows, cols)),
                             expected, atol=1e-6)


def test_image_embedding_count_outside_the_pooling_table_is_refused():
  with pytest.raises(ValueError, match="not in the pooling table"):
    mmbt.MMBTConfig(num_image_embeddings=5)


def test_sequence_holds_cls_images_sep_then_text(model, inputs):
  text, pixels = inputs
  outputs = model(**text, pixel_values=pixels)
  assert outputs["logits"].shape == (2, 5) and outputs["logits"].dtype == jnp.float32
  # [CLS] + 4 images + [SEP] + the text without its own [CLS].
  assert outputs["last_hidden_state"].shape == (2, 1 + 4 + 1 + 5, 32)


def test_cached_image_features_and_all_true_keep_masks_change_nothing(model, inputs):
  text, pixels = inputs
  reference = model(**text, pixel_values=pixels)["logits"]
  features = model.image_features(pixels)
  assert features.shape == (2, 4, 16)
  cached = model(**text, image_features=features, text_keep=jnp.ones((2, 6), bool),
                 image_keep=jnp.ones((2, 4), bool))["logits"]
  np.testing.assert_allclose(cached, reference, atol=1e-6)


def test_masked_text_tokens_become_the_mask_token(model, inputs):
  text, pixels = inputs
  keep = jnp.array([[True, False, True, True, True, True]] * 2)
  masked = model(**text, pixel_values=pixels, text_keep=keep)["logits"]
  replaced = dict(text, input_ids=text["input_ids"].at[:, 1].set(MASK))
  np.testing.assert_allclose(masked, model(**replaced, pixel_values=pixels)["logits"], atol=1e-6)
  assert not np.allclose(masked, model(**text, pixel_values=pixels)["logits"], atol=1e-4)


def test_attention_masking_removes_tokens_and_images_from_view(inputs):
  text, pixels = inputs
  model = _model(text_masking="attention", image_masking="attention")
  features = model.image_features(pixels)
  text_keep = jnp.array([[True, False, True, True, True, True]] * 2)
  image_keep = jnp.array([[True, False, True, False]] * 2)
  masked = model(**text, image_features=features, text_keep=text_keep, image_keep=image_keep)
  # What a masked player holds no longer matters.
  changed_ids = dict(text, input_ids=text["input_ids"].at[:, 1].set(17))
  changed_features = features.at[:, 1].set(5.0).at[:, 3].set(-5.0)
  again = model(**changed_ids, image_features=changed_features, text_keep=text_keep,
                image_keep=image_keep)
  np.testing.assert_allclose(masked["logits"], again["logits"], atol=1e-5)


def test_zero_image_masking_blanks_the_image_embeddings(model, inputs):
  text, pixels = inputs
  features = model.image_features(pixels)
  none_kept = model(**text, image_features=features, image_keep=jnp.zeros((2, 4), bool))["logits"]
  other_image = model(**text, image_features=features * 3 + 1,
                      image_keep=jnp.zeros((2, 4), bool))["logits"]
  np.testing.assert_allclose(none_kept, other_image, atol=1e-6)


def test_resnet_tower_works_in_place_of_clip(inputs):
  text, pixels = inputs
  model = _model(num_image_embeddings=6, tower="resnet")
  assert model.image_features(pixels).shape == (2, 6, 16)
  assert model(**text, pixel_values=pixels)["logits"].shape == (2, 5)


def test_pixels_and_features_together_are_refused(model, inputs):
  text, pixels = inputs
  with pytest.raises(ValueError, match="exactly one of pixel_values or image_features"):
    model(**text, pixel_values=pixels, image_features=model.image_features(pixels))
