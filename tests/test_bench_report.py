"""scripts/bench_report.py: JAX/PyTorch ratios, the issue #7 goals and their pass/fail, on synthetic runs."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import bench_report  # pylint: disable=g-import-not-at-top,wrong-import-position


def _train(small: bool = False, **rates: float) -> dict:
  return {"small": small,
          "environment": {"device_kind": "NVIDIA H200", "device_count": 2, "jax_version": "0.11.2",
                          "flax_version": "0.12.10", "compute_dtype": "bfloat16"},
          "cases": [{"name": name, "examples_per_s": rate, "mfu": 0.5, "tflops_per_s": 400.0,
                     "flops_source": "xla_compiled_cost_analysis", "compile_s": 30.0}
                    for name, rate in rates.items()]}


def _torch(small: bool = False, **rates: float) -> dict:
  return {"small": small,
          "environment": {"device_name": "NVIDIA H200", "torch_version": "2.11",
                          "transformers_version": "5.17"},
          "cases": [{"name": name, "examples_per_s": rate} for name, rate in rates.items()]
                   + [{"name": "resnet152_train_b128", "skipped": "torchvision does not import"}]}


def _mmshap(small: bool = False, seconds_p16: float = 2.0) -> dict:
  rows = [{"num_players": p, "coalitions_per_example": 2 ** p,
           "engine_seconds_per_example": seconds, "engine_coalitions_per_s": 2 ** p / seconds,
           "baseline_coalitions_per_s": 200.0, "speedup": 2 ** p / seconds / 200.0}
          for p, seconds in ((8, 0.05), (16, seconds_p16))]
  return {"small": small, "results": rows}


def _goals(report: dict) -> dict[str, dict]:
  return {goal["goal"]: goal for goal in report["goals"]}


def test_ratio_is_jax_over_torch_and_per_device_divides_by_jax_devices():
  report = bench_report.merge(_train(bert_train_b64=3000.0), None, _torch(bert_train_b64=1500.0))
  row = {case["name"]: case for case in report["cases"]}["bert_train_b64"]
  assert row["jax_over_torch"] == pytest.approx(2.0)
  assert row["jax_over_torch_per_device"] == pytest.approx(1.0)  # 2 JAX devices, 1 PyTorch device.
  assert row["jax_mfu"] == 0.5 and row["jax_status"] == row["torch_status"] == "measured"


def test_goals_pass_and_fail_against_the_issue_thresholds():
  train = _train(bert_train_b64=2900.0, bert_train_b256=5999.0)
  torch = _torch(bert_forward_b1024=15000.0, bert_forward_b1_per_call=150.0)
  goals = _goals(bench_report.merge(train, _mmshap(seconds_p16=2.5), torch))
  rate = 2 ** 16 / 2.5  # 26,214 coalitions/s: the largest game's rate is the one judged.
  expected = {
      "BERT-base fine-tuning, L=128, B=64": (2900.0, "pass"),  # The threshold itself passes.
      "BERT-base fine-tuning, L=128, B=256": (5999.0, "FAIL"),
      "ResNet-152 training, 224 px, B=128": (None, "not measured"),
      "MM-SHAP exact coalition evaluations, BERT-base size, L=128 (largest p timed)": (rate, "pass"),
      "MM-SHAP coalitions/s over batched PyTorch BERT-base forward (B=1024)": (rate / 15000, "pass"),
      "MM-SHAP coalitions/s over PyTorch one-input-per-call forward": (rate / 150, "pass"),
      "MM-SHAP, one example, p=16 (65,536 coalitions)": (2.5, "pass"),
  }
  assert set(goals) == set(expected)
  for name, (value, status) in expected.items():
    assert goals[name]["value"] == pytest.approx(value), name
    assert goals[name]["status"] == status, name
  slow = _goals(bench_report.merge(train, _mmshap(seconds_p16=3.5), torch))
  assert slow["MM-SHAP, one example, p=16 (65,536 coalitions)"]["status"] == "FAIL"  # <= 3 s.
  assert slow["MM-SHAP coalitions/s over batched PyTorch BERT-base forward (B=1024)"][
      "status"] == "FAIL"  # 18,725 / 15,000 < 1.6.


def test_ratio_goals_without_a_torch_run_are_not_measured_not_judged():
  goals = _goals(bench_report.merge(_train(), _mmshap(), None))
  assert goals["MM-SHAP coalitions/s over PyTorch one-input-per-call forward"]["status"] == (
      "not measured")
  assert goals["MM-SHAP exact coalition evaluations, BERT-base size, L=128 (largest p timed)"][
      "status"] == "pass"


def test_small_runs_judge_no_goal():
  report = bench_report.merge(_train(True, bert_train_b64=1e6), _mmshap(True), _torch(True))
  assert report["small"]
  assert {goal["status"] for goal in report["goals"]} == {"n/a (--small smoke run)"}
  assert "smoke run" in bench_report.markdown(report)


def test_mixing_small_and_full_runs_is_an_error():
  with pytest.raises(ValueError, match="mix --small and full-size"):
    bench_report.merge(_train(small=True), None, _torch(small=False))


def test_statuses_name_skipped_failed_and_missing_runs():
  train = _train(bert_train_b64=100.0)
  train["cases"].append({"name": "bert_train_b256", "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"})
  report = bench_report.merge(train, None, _torch(bert_train_b64=50.0))
  rows = {case["name"]: case for case in report["cases"]}
  assert rows["bert_train_b256"]["jax_status"] == "error: XlaRuntimeError: RESOURCE_EXHAUSTED"
  assert rows["resnet152_train_b128"]["torch_status"] == "skipped: torchvision does not import"
  assert rows["clip_vit_b32_forward_b1024"]["jax_status"] == "not run (case not selected)"
  assert report["mmshap_status"].startswith("not run")
  assert rows["bert_forward_b1_per_call"]["jax_status"] == "PyTorch only"
  missing = bench_report.merge(None, None, None)
  assert {case["jax_status"] for case in missing["cases"] if case["name"] in bench_report.CASES} == {
      "not run (bench_train.py wrote no JSON)"}
  table = bench_report.markdown(report)
  assert "| bert_train_b64 | 100 | 50 | 2.00 |" in table
  assert "RESOURCE_EXHAUSTED" in table and "MM-SHAP: not run" in table


def test_main_merges_files_and_prints_the_tables(tmp_path, capsys):
  paths = {}
  for name, value in (("train", _train(bert_train_b64=3000.0)), ("mmshap", _mmshap()),
                      ("torch", _torch(bert_train_b64=1500.0))):
    paths[name] = tmp_path / f"{name}.json"
    paths[name].write_text(json.dumps(value))
  (tmp_path / "smi.csv").write_text("NVIDIA H200, 570.86.15, 143771 MiB\n")
  out = tmp_path / "report.json"
  bench_report.main([f"--train={paths['train']}", f"--mmshap={paths['mmshap']}",
                     f"--torch={paths['torch']}", f"--nvidia_smi={tmp_path / 'smi.csv'}",
                     f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["nvidia_smi"] == "NVIDIA H200, 570.86.15, 143771 MiB"
  assert report["inputs"]["train"]["cases"][0]["examples_per_s"] == 3000.0
  printed = capsys.readouterr().out
  assert "| goal (issue #7) |" in printed and "570.86.15" in printed


def test_unreadable_input_names_the_file(tmp_path):
  broken = tmp_path / "train.json"
  broken.write_text("{")
  with pytest.raises(ValueError, match="train.json: not valid JSON"):
    bench_report.main([f"--train={broken}", f"--out={tmp_path / 'report.json'}"])
