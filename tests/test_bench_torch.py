"""scripts/bench_torch.py: the --small PyTorch baselines run on a CPU; what cannot run is recorded."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import bench_torch  # pylint: disable=g-import-not-at-top,wrong-import-position

pytest.importorskip("torch")
pytest.importorskip("transformers")

SMALL = bench_torch.Settings(small=True, warmup=1, windows=2, steps=1, calls_per_window=2)


def test_small_forward_and_per_call_cases_measure_examples_per_second(tmp_path):
  out = tmp_path / "torch.json"
  bench_torch.main(["--small", "--cases=bert_forward_b1024,bert_forward_b1_per_call", "--warmup=1",
                    "--windows=2", "--steps=1", "--calls_per_window=2", f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["small"] and report["environment"]["torch_version"]
  batched, per_call = report["cases"]
  assert batched["name"] == "bert_forward_b1024" and batched["batch_size"] == 32
  assert per_call["name"] == "bert_forward_b1_per_call" and per_call["batch_size"] == 1
  for case in (batched, per_call):
    assert case["examples_per_s"] > 0 and len(case["window_step_times_s"]) == 2
  # A per-call window is `calls_per_window` calls; its step time is one call's.
  assert per_call["examples_per_s"] == pytest.approx(1 / per_call["step_time_s"])


def test_small_train_case_steps_the_optimizer_to_a_finite_loss():
  (case,) = bench_torch.run(["bert_train_b64"], SMALL)["cases"]
  assert case["examples_per_s"] > 0 and case["batch_size"] == 8
  assert 0 < case["loss_after_timing"] < 10


def test_resnet_case_is_skipped_with_the_reason_without_torchvision():
  (case,) = bench_torch.run(["resnet152_train_b128"], SMALL)["cases"]
  if importlib.util.find_spec("torchvision") is None:
    assert "torchvision" in case["skipped"] and "examples_per_s" not in case
  else:
    assert case["examples_per_s"] > 0


def test_full_size_without_a_gpu_skips_every_case_with_the_reason():
  torch = pytest.importorskip("torch")
  if torch.cuda.is_available():
    pytest.skip("a GPU is present: the full-size cases would run")
  report = bench_torch.run(["bert_train_b64", "bert_forward_b1024"],
                           bench_torch.Settings(small=False))
  assert [case["skipped"] for case in report["cases"]] == [
      "no CUDA device: full-size baselines need a GPU (--small runs on the CPU)"] * 2
