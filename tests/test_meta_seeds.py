"""The seed spread of the meta stage: aggregation and its table."""

import pytest

from scripts import meta_seeds


def _report(stacked_f1, text_f1=0.9):
  return {"methods": {"text": {"f1_macro": text_f1, "accuracy": 0.9},
                      "stacked": {"f1_macro": stacked_f1, "accuracy": 0.95}}}


def test_aggregate_gives_mean_population_std_and_range_per_method_and_metric():
  summary = meta_seeds.aggregate([_report(0.90), _report(0.94), _report(0.98)])
  stacked = summary["stacked"]["f1_macro"]
  assert stacked["mean"] == pytest.approx(0.94)
  assert stacked["std"] == pytest.approx(0.0326598, rel=1e-5)
  assert (stacked["min"], stacked["max"]) == (0.90, 0.98)
  assert summary["text"]["f1_macro"]["std"] == 0.0  # Base learners do not depend on the meta seed.


def test_reports_with_different_methods_are_refused():
  other = {"methods": {"text": {"f1_macro": 0.9, "accuracy": 0.9}}}
  with pytest.raises(ValueError, match="different methods"):
    meta_seeds.aggregate([_report(0.9), other])


def test_markdown_lists_every_method_with_mean_and_std():
  summary = meta_seeds.aggregate([_report(0.90), _report(0.94)])
  summary = {m: {k: v for k, v in metrics.items()} for m, metrics in summary.items()}
  for values in summary.values():
    for name in meta_seeds.TABLE_METRICS:
      values.setdefault(name, values["accuracy"])
  table = meta_seeds.markdown(summary, [0, 1])
  assert "| stacked | " in table and "0.9200 ± 0.0200 (0.9000-0.9400)" in table
