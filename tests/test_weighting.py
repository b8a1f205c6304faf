"""MM-SHAP weighting of the meta-features: the arithmetic of each weighting, from independently
computed expectations."""

import numpy as np
import pytest

import fakes
from jmmshap import learner_outputs, weighting
from jmmshap.builders import EVAL_SPLITS

def test_weighted_features_scale_text_by_t_shap_image_by_v_shap_and_mmbt_by_its_weight():
  logits = {"text": np.asarray([[1.0, 2.0], [3.0, 4.0]]), "image": np.asarray([[10.0, 20.0],
                                                                                [30.0, 40.0]]),
            "mmbt": np.asarray([[5.0, 6.0], [7.0, 8.0]])}
  features = weighting.weighted_features(logits, np.asarray([0.25, 1.0]), np.asarray([0.75, 0.0]),
                                    mmbt_weight=2.0, append_shares=True)
  np.testing.assert_allclose(features, [[0.25, 0.5, 7.5, 15.0, 10.0, 12.0, 0.25, 0.75],
                                        [3.0, 4.0, 0.0, 0.0, 14.0, 16.0, 1.0, 0.0]])
  plain = weighting.weighted_features(logits, 1.0, 1.0)
  np.testing.assert_array_equal(plain, np.concatenate([logits["text"], logits["image"],
                                                       logits["mmbt"]], axis=1))


def _validation_t_mean(outputs):
  """fake_workdir's validation T-SHAP: 0.8 on classes 0-1, 0.3 on 2-3, averaged independently."""
  return np.where(outputs["validation"].labels < 2, 0.8, 0.3).mean()


def test_dataset_weighting_uses_validation_mean_shares_on_every_split(tmp_path):
  """Test shares with another mean must not leak in: the dataset shares are validation's."""
  workdir = fakes.fake_workdir(str(tmp_path))
  outputs = {split: learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS}
  fakes.write_shares(workdir, "test", outputs["test"].ids, np.full(len(outputs["test"].ids), 0.95))
  shares = {split: learner_outputs.load_shares(workdir, outputs[split]) for split in EVAL_SPLITS}
  data = weighting.method_data(outputs, shares, "dataset", fakes.meta_config().meta)
  t_mean = _validation_t_mean(outputs)
  assert abs(t_mean - 0.95) > 0.3
  assert data.shares["dataset_t_shap"] == pytest.approx(t_mean)
  assert data.shares["dataset_v_shap"] == pytest.approx(1 - t_mean)
  for split in EVAL_SPLITS:
    logits = outputs[split].logits
    np.testing.assert_allclose(data.features[split][:, :4], t_mean * logits["text"], rtol=1e-6)
    np.testing.assert_allclose(data.features[split][:, 4:8], (1 - t_mean) * logits["image"],
                               rtol=1e-6)
    np.testing.assert_array_equal(data.features[split][:, 8:], logits["mmbt"])


def test_sample_weighting_uses_each_examples_shares_and_the_validation_mean_where_undefined(tmp_path):
  """Undefined test shares fall back to validation's mean, not to the test split's own."""
  workdir = fakes.fake_workdir(str(tmp_path))
  outputs = {split: learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS}
  t_shap = np.linspace(0.6, 0.95, len(outputs["test"].ids))
  t_shap[3] = np.nan  # Every Shapley value 0: T-SHAP is 0/0.
  fakes.write_shares(workdir, "test", outputs["test"].ids, t_shap)
  shares = {split: learner_outputs.load_shares(workdir, outputs[split]) for split in EVAL_SPLITS}
  data = weighting.method_data(outputs, shares, "sample", fakes.meta_config(append_shares=True).meta)
  features = data.features["test"]
  fallback = _validation_t_mean(outputs)
  assert abs(fallback - np.nanmean(t_shap)) > 0.2  # Test's own mean would be another value.
  expected_t = np.where(np.isnan(t_shap), fallback, t_shap)
  np.testing.assert_allclose(features[:, :4], expected_t[:, None] * outputs["test"].logits["text"],
                             rtol=1e-6)
  np.testing.assert_allclose(features[:, 4:8],
                             (1 - expected_t[:, None]) * outputs["test"].logits["image"], rtol=1e-6)
  np.testing.assert_allclose(features[:, -2:], np.stack([expected_t, 1 - expected_t], 1), rtol=1e-6)
  assert data.shares["undefined_test"] == 1 and data.shares["undefined_validation"] == 0


def test_sample_weighting_without_every_examples_shares_says_how_to_get_them(tmp_path):
  workdir = fakes.fake_workdir(str(tmp_path))
  outputs = {split: learner_outputs.load_base_outputs(workdir, split) for split in EVAL_SPLITS}
  ids = outputs["test"].ids[:8]  # As if mmshap ran with max_examples=8.
  fakes.write_shares(workdir, "test", ids, np.full(len(ids), 0.5))
  shares = {split: learner_outputs.load_shares(workdir, outputs[split]) for split in EVAL_SPLITS}
  weighting.method_data(outputs, shares, "dataset", fakes.meta_config().meta)  # The mean needs no full coverage.
  with pytest.raises(ValueError, match=r"mmshap_test.npz has MM-SHAP for 8 of 20 test examples .*"
                                       r"max_examples=0 .*drop 'sample'"):
    weighting.method_data(outputs, shares, "sample", fakes.meta_config().meta)


def test_complement_weighting_scales_each_learner_by_one_minus_the_mmbt_share_of_its_modality():
  """Hand-made shares: a collapsed example (T=1), a balanced one, an image-led one, and one whose
  shares are undefined (falls back to the complement of the dataset shares)."""
  logits = {"text": np.asarray([[1.0, 2.0]] * 4), "image": np.asarray([[10.0, 20.0]] * 4),
            "mmbt": np.asarray([[5.0, 6.0]] * 4)}
  shares = learner_outputs.Shares(t_shap=np.asarray([1.0, 0.5, 0.2, np.nan]),
                                  v_shap=np.asarray([0.0, 0.5, 0.8, np.nan]),
                                  explained=np.ones(4, bool), path="hand-made")
  features, undefined = weighting.split_features("complement", logits, fakes.meta_config().meta,
                                                 (0.9, 0.1), shares, "test")
  np.testing.assert_allclose(features, [[0.0, 0.0, 10.0, 20.0, 5.0, 6.0],    # Text x 0, image x 1.
                                        [0.5, 1.0, 5.0, 10.0, 5.0, 6.0],
                                        [0.8, 1.6, 2.0, 4.0, 5.0, 6.0],
                                        [0.1, 0.2, 9.0, 18.0, 5.0, 6.0]], rtol=1e-6)
  assert undefined == 1
  paper, _ = weighting.split_features("sample", logits, fakes.meta_config().meta, (0.9, 0.1),
                                      shares, "test")
  np.testing.assert_allclose(paper[0], [1.0, 2.0, 0.0, 0.0, 5.0, 6.0])  # The paper's: image x 0.
  assert weighting.METHOD_OF_WEIGHTING["complement"] == "mmshap_complement"


def test_unknown_weighting_is_refused():
  with pytest.raises(ValueError, match="meta.weighting='none,modality'"):
    weighting.parse_weightings("none,modality")
