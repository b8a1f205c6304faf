"""The meta-learner: which validation examples each member trains on and holds out."""

import numpy as np

import fakes
from jmmshap import meta

def test_cross_fit_holds_every_validation_example_out_exactly_once_with_balanced_classes():
  labels = np.repeat(np.arange(4), 5)
  config = fakes.meta_config(cross_fit=3).meta
  train, holdout = meta.member_masks(labels, config, seed=0)
  assert train.shape == holdout.shape == (3, 20)
  np.testing.assert_array_equal(holdout.sum(axis=0), 1)
  np.testing.assert_array_equal(train, ~holdout)
  assert sorted(holdout.sum(axis=1)) == [6, 7, 7]
  for member in holdout:  # Every class appears in every fold's training part.
    assert set(labels[~member]) == set(range(4))



def test_early_stopping_holds_out_a_stratified_fraction_of_validation():
  labels = np.repeat(np.arange(4), 10)
  train, holdout = meta.member_masks(labels, fakes.meta_config(early_stopping=True, holdout_fraction=0.2).meta,
                                     seed=0)
  assert train.shape == holdout.shape == (1, 40)
  np.testing.assert_array_equal(np.bincount(labels[holdout[0]]), [2, 2, 2, 2])
  np.testing.assert_array_equal(train, ~holdout)
  plain_train, plain_holdout = meta.member_masks(labels, fakes.meta_config().meta, seed=0)
  assert plain_train.all() and not plain_holdout.any()  # The paper: all of validation.
