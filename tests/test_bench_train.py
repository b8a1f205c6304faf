"""scripts/bench_train.py: the --small train case end to end, its FLOP counts, batch sizes and flags."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position

from jmmshap.models import bert  # pylint: disable=g-import-not-at-top,wrong-import-position


def _bert_forward_matmul_flops(config: bert.BertConfig, length: int, num_labels: int) -> int:
  """Hand count per example: projections, feed-forward, attention scores and mix, pooler, head."""
  hidden, inner = config.hidden_size, config.intermediate_size
  per_token = 2 * (4 * hidden * hidden + 2 * hidden * inner) + 2 * 2 * length * hidden
  return (config.num_hidden_layers * length * per_token + 2 * hidden * hidden
          + 2 * hidden * num_labels)


def test_small_train_case_writes_throughput_flops_mfu_and_finite_loss(tmp_path):
  out = tmp_path / "train.json"
  bench_train.main(["--small", "--cases=bert_train_b64", "--windows=2", "--steps=1",
                    "--warmup=1", "--peak_tflops=1", f"--out={out}"])
  report = json.loads(out.read_text())
  assert report["small"] is True
  environment = report["environment"]
  for key in ("device_kind", "device_count", "jax_version", "flax_version", "compute_dtype"):
    assert environment[key], key
  (case,) = report["cases"]
  assert case["name"] == "bert_train_b64" and case["mode"] == "train"
  assert case["batch_size"] == 8 and case["per_device_batch_size"] == 8 // jax.device_count()
  for key in ("examples_per_s", "step_time_s", "compile_s", "trace_and_lower_s", "flops_per_example",
              "tflops_per_s", "tflops_per_s_per_device", "mfu"):
    assert case[key] > 0, key
  assert len(case["window_step_times_s"]) == 2
  assert case["examples_per_s"] == pytest.approx(case["batch_size"] / case["step_time_s"])
  assert case["flops_source"] == "xla_compiled_cost_analysis"
  assert case["mfu"] == pytest.approx(case["tflops_per_s_per_device"] / 1.0)
  # The step's dots: forward, then input and weight gradients (2x forward) of the tiny one-layer BERT.
  config = dataclasses.replace(bert.BertConfig.tiny(), num_hidden_layers=1)
  forward = _bert_forward_matmul_flops(config, case["sequence_length"], bench_train.NUM_LABELS)
  assert case["matmul_flops_per_example"] == pytest.approx(3 * forward)
  # XLA also counts element-wise work and the optimizer update.
  assert case["flops_per_example"] > case["matmul_flops_per_example"]
  assert 0 < case["loss_after_timing"] < 10


def test_matmul_flops_counts_dots_convolutions_nested_jits_and_scans():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  images, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))

  def conv(images, kernel, stride):
    return jax.lax.conv_general_dilated(images, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def program(x, w, images, kernel):
    scanned, _ = jax.lax.scan(lambda carry, _: (carry @ jnp.ones((16, 16)), None), x @ w, length=3)
    return jax.jit(conv, static_argnums=2)(images, kernel, 1), scanned

  dots = 2 * 4 * 16 * 8 + 3 * 2 * 4 * 16 * 16
  convolution = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  jaxpr = jax.make_jaxpr(program)(x, w, images, kernel)
  assert bench_train.matmul_flops(jaxpr) == dots + convolution


def test_matmul_flops_input_gradient_of_strided_convolution_costs_what_its_forward_does():
  images, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  conv = lambda images: jax.lax.conv_general_dilated(
      images, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  forward = bench_train.matmul_flops(jax.make_jaxpr(conv)(images))
  assert forward == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)
  # The transpose is a convolution over the output gradient dilated by the stride (zeros inserted).
  transpose = jax.linear_transpose(conv, images)
  transpose_jaxpr = jax.make_jaxpr(transpose)(jnp.ones((2, 4, 4, 5)))
  assert [eqn.params["lhs_dilation"] for eqn in transpose_jaxpr.eqns
          if eqn.primitive.name == "conv_general_dilated"] == [(2, 2)]
  assert bench_train.matmul_flops(transpose_jaxpr) == pytest.approx(forward)


def test_small_batches_round_up_to_the_device_count_and_full_ones_must_divide_it():
  devices = jax.device_count()
  odd = bench_train.CaseSpec("bert", "train", batch_size=devices * 4 + 1, small_batch_size=1)
  assert bench_train.global_batch_size(odd, small=True) == devices
  if devices > 1:
    with pytest.raises(ValueError, match="does not split over"):
      bench_train.global_batch_size(odd, small=False)


def test_cpu_runs_report_no_mfu_unless_given_a_peak():
  assert bench_train.default_peak(None) == (None, "none: not a GPU and no --peak_tflops given")
  assert bench_train.default_peak(400.0) == (400.0, "--peak_tflops")
  assert bench_train.default_peak(0.0)[0] is None


@pytest.mark.parametrize("argv, message", [
    (["--cases=bert_train_b64,gpt"], "unknown \\['gpt'\\]"),
    (["--steps=0"], "--steps=0"),
    (["--warmup=0"], "--warmup=0"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit):
    bench_train.parse_args(argv)
  assert re.search(message, capsys.readouterr().err)
