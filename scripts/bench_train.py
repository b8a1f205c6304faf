r"""Issue #7's throughput cases for the shipped JAX steps: examples/s, XLA FLOPs, TFLOP/s and MFU.

  PYTHONPATH=. python scripts/bench_train.py --dtype=bfloat16 --out=train.json   # one H100/H200 host
  PYTHONPATH=. python scripts/bench_train.py --small --out=/tmp/train.json         # a CPU smoke run

(from the repository root; `scripts/bench_gpu.sh` runs this, bench_mmshap.py and bench_torch.py in
one call and merges them with bench_report.py.)

Cases (`bench_report.CASES`, named alike in bench_torch.py):
  bert_train_b64, bert_train_b256   BERT-base sequence classification train step, L = 128
  resnet152_train_b128              ResNet-152 train step, 224 px (NHWC, i.e. channels-last)
  clip_vit_b32_forward_b1024        CLIP ViT-B/32 vision tower to its pooled output, 224 px
  bert_forward_b1024                BERT-base sequence classification eval step, L = 128

What is timed is what ships. Train cases: `classifier.make_train_step` with
`train_lib.make_optimizer`'s AdamW (weight-decay mask, global-norm clipping, warm-up + cosine
schedule; the text and image stages' optimizer), dropout on, BatchNorm in training mode, jitted as
`train_lib` jits it: the state replicated by `parallel.replicate` and donated, the batch split over
the `data` axis of `parallel.make_mesh()`, i.e. over every device, so the same command is data
parallel on an 8-GPU host. Forward cases: BERT runs `classifier.make_eval_step`; CLIP has no
classifier head, so its case runs the tower's `pooler_output`, the per-image work of the MMBT and
MM-SHAP. Params are float32; `--dtype` is the compute dtype (`config.dtype` of the stages).

Inputs are random (token ids over the whole vocabulary, no padding; N(0, 1) pixels; random labels),
drawn once on the devices, already sharded: no host transfer is timed. Each step is traced, lowered
and compiled once (times recorded apart). After `--warmup` steps, `--windows` windows of `--steps`
back-to-back steps are timed, each ended by one `jax.block_until_ready`; a step's time is the
median window's time / `--steps`.

FLOPs per example: XLA's count for the compiled program (`compiled.cost_analysis()`, one device's
share, times the device count; element-wise work, backward pass and optimizer update included).
Where the backend gives no count, the pre-optimisation program's count, and failing that the
matmul count below; `flops_source` says which. Every record also holds the matmul count: 2 x the
multiply-adds of every dot_general and convolution in the step's jaxpr, the usual model-FLOPs
convention, so a GPU run shows at once whether XLA's count missed cuBLAS/cuDNN calls.
MFU = achieved FLOP/s per device / `--peak_tflops`, one device's dense peak for the compute dtype
(default on GPUs: 989, H100 SXM and H200 bf16 dense; give the TF32 peak, 495, for float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# Sibling scripts (scripts/ is on sys.path when this file runs): bench_models holds the model
# workloads and timing helpers shared with the per-model benchmark, bench_report the case names.
import bench_models
import bench_report

from jmmshap import classifier, parallel, train_lib
from jmmshap.models import bert, clip_vision

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
GPU_PEAK_TFLOPS = 989.0  # NVIDIA's dense bf16 datasheet peak of one H100 SXM or H200.
NUM_LABELS = 10
# configs/text.py's and configs/image.py's optimizer; its numbers do not change the step's cost.
OPTIMIZER = ml_collections.ConfigDict(dict(
    name="adamw", learning_rate=1e-4, weight_decay=0.01, warmup_fraction=0.1, schedule="cosine",
    grad_clip_norm=1.0))


@dataclasses.dataclass(frozen=True)
class CaseSpec:
  """A model, what is timed on it, and its global batch (full size and `--small`)."""
  model: str  # "bert", "resnet" or "clip_vision" (see `workload`).
  mode: str  # "train" (train step) or "forward".
  batch_size: int
  small_batch_size: int


CASE_SPECS = {
    "bert_train_b64": CaseSpec("bert", "train", 64, 8),
    "bert_train_b256": CaseSpec("bert", "train", 256, 16),
    "resnet152_train_b128": CaseSpec("resnet", "train", 128, 8),
    "clip_vit_b32_forward_b1024": CaseSpec("clip_vision", "forward", 1024, 32),
    "bert_forward_b1024": CaseSpec("bert", "forward", 1024, 32),
}
assert set(CASE_SPECS) == set(bench_report.CASES), "bench_report.CASES names the same cases"


def clip_vision_workload(small: bool) -> bench_models.Workload:
  """CLIP ViT-B/32's vision tower at 224 px (one 32-wide layer at 32 px with `small`)."""
  if small:
    config = clip_vision.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                          num_attention_heads=4, image_size=32, patch_size=8)
  else:
    config = clip_vision.CLIPVisionConfig()
  size = config.image_size

  def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    return {"pixel_values": jax.random.normal(key, (batch_size, size, size, 3), jnp.float32)}

  return bench_models.Workload(
      lambda dtype, rngs: clip_vision.CLIPVisionModel(config, dtype=dtype, rngs=rngs),
      ("pixel_values",), make_batch,
      {"image_size": size, "patch_size": config.patch_size, "hidden_size": config.hidden_size,
       "num_layers": config.num_hidden_layers})


def workload(model: str, small: bool) -> bench_models.Workload:
  sizes = bench_models.Sizes(small=small, bert_length=128, resnet_image_size=224,
                             mmbt_image_size=224, mmbt_text_length=120, num_labels=NUM_LABELS)
  if model == "bert":
    return bench_models.bert_workload(sizes)
  if model == "resnet":
    return bench_models.resnet_workload(sizes)
  if model == "clip_vision":
    return clip_vision_workload(small)
  raise ValueError(f"unknown model {model!r}")


# ---------------------------------------------------------------------------------------------------
# FLOPs.


def _nested_jaxprs(value: Any) -> Iterator[Any]:
  if hasattr(value, "eqns"):  # A Jaxpr.
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # A ClosedJaxpr.
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _nested_jaxprs(item)


def matmul_flops(jaxpr: Any) -> float:
  """2 x the multiply-adds of every dot_general and convolution in a (closed) jaxpr.

  Nested programs (jit, remat, custom_jvp bodies) count too, a scan's body once per iteration.
  Element-wise work is left out: this is the model-FLOPs count MFU is usually quoted with.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    output_size = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * output_size * math.prod(lhs_shape[d] for d in lhs_contracting)
    elif name == "conv_general_dilated":
      # Each output element sums (input features per group) x (window) products, of which only
      # 1 / prod(lhs_dilation) fall on real inputs: the zeros a strided convolution's input gradient
      # inserts are not work.
      kernel_shape = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec
      taps = math.prod(kernel_shape[d] for d in rhs_spec[1:])
      total += 2.0 * output_size * taps / math.prod(eqn.params["lhs_dilation"])
    repeats = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for nested in _nested_jaxprs(value):
        total += repeats * matmul_flops(nested)
  return total


def step_flops(compiled: jax.stages.Compiled, lowered: jax.stages.Lowered, matmul: float,
               device_count: int) -> tuple[float, str]:
  """FLOPs of one whole step (all devices) and where the number comes from."""
  per_device = bench_models.xla_flops(compiled)  # One device's share of the SPMD program.
  if per_device is not None:
    return per_device * device_count, "xla_compiled_cost_analysis"
  whole = bench_models.xla_flops(lowered)
  if whole is not None:
    return whole, "xla_unoptimized_cost_analysis"
  return matmul, "jaxpr_matmul_count"


# ---------------------------------------------------------------------------------------------------
# The programs.


@dataclasses.dataclass
class Program:
  """A jitted step with its arguments; `run(n)` dispatches n steps and returns the last outputs."""
  jitted: Any
  args: tuple[Any, ...]
  make_runner: Callable[[jax.stages.Compiled], Callable[[int], Any]]


def train_program(model: nnx.Module, inputs: tuple[str, ...], batch: dict[str, jax.Array],
                  mesh: jax.sharding.Mesh) -> Program:
  """train_lib's train step, jitted, sharded and donated as `train_lib.fit` does."""
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  optimizer, _ = train_lib.make_optimizer(OPTIMIZER, total_steps=10_000)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": optimizer.init(params)}
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = parallel.replicate(state, mesh)
  step = jax.jit(classifier.make_train_step(graphdef, inputs, optimizer),
                 in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                 donate_argnums=0)

  def make_runner(compiled):
    current = state

    def run(count: int):
      nonlocal current
      metrics = {}
      for _ in range(count):
        current, metrics = compiled(current, batch)  # The old state is donated.
      return current, metrics

    return run

  return Program(step, (state, batch), make_runner)


def forward_program(model: nnx.Module, inputs: tuple[str, ...], batch: dict[str, jax.Array],
                    mesh: jax.sharding.Mesh, output: str) -> Program:
  """The eval-mode forward: train_lib's eval step for classifiers, else `model(...)[output]`."""
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = parallel.replicate((nnx.as_pure(params), nnx.as_pure(model_state)), mesh)
  if output == "logits":
    forward = classifier.make_eval_step(graphdef, inputs)
  else:
    def forward(params, model_state, batch):
      module = nnx.merge(graphdef, params, model_state)
      return module(**{name: batch[name] for name in inputs})[output]
  replicated, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  jitted = jax.jit(forward, in_shardings=(replicated, replicated, batch_sharding),
                   out_shardings=batch_sharding)

  def make_runner(compiled):
    def run(count: int):
      return [compiled(params, model_state, batch) for _ in range(count)]
    return run

  return Program(jitted, (params, model_state, batch), make_runner)


# ---------------------------------------------------------------------------------------------------
# One case.


@dataclasses.dataclass(frozen=True)
class Settings:
  small: bool = False
  dtype: str = "bfloat16"
  warmup: int = 2
  windows: int = 5
  steps: int = 10
  peak_tflops: float | None = None  # One device's dense peak; None: no MFU.
  peak_source: str = "none"
  seed: int = 0


def global_batch_size(spec: CaseSpec, small: bool) -> int:
  """The case's batch; a --small batch is rounded up to a multiple of the device count."""
  if not small:
    parallel.check_batch_size(spec.batch_size, "the case's batch size")
    return spec.batch_size
  devices = jax.device_count()
  return -(-spec.small_batch_size // devices) * devices


def run_case(name: str, settings: Settings, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Builds, compiles and times one case; the JSON record of bench_train's `cases`."""
  spec = CASE_SPECS[name]
  work = workload(spec.model, settings.small)
  batch_size = global_batch_size(spec, settings.small)
  batch = bench_models.random_batch(work, batch_size, NUM_LABELS, settings.seed, mesh)
  start = time.perf_counter()
  model = work.build(DTYPES[settings.dtype], nnx.Rngs(settings.seed))
  num_params = bert.count_params(model)
  if spec.mode == "train":
    program = train_program(model, work.inputs, batch, mesh)
  else:
    output = "pooler_output" if spec.model == "clip_vision" else "logits"
    program = forward_program(model, work.inputs, batch, mesh, output)
  del model  # The programs hold the arrays; the train state is donated.
  setup_seconds = time.perf_counter() - start

  start = time.perf_counter()
  traced = program.jitted.trace(*program.args)
  lowered = traced.lower()
  trace_seconds = time.perf_counter() - start
  compiler_options = ({"xla_backend_optimization_level": 0}
                      if settings.small and jax.devices()[0].platform == "cpu" else None)
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options)
  compile_seconds = time.perf_counter() - start

  run = program.make_runner(compiled)
  times = bench_models.seconds_per_step(run, settings.warmup, settings.windows, settings.steps)
  step_seconds = statistics.median(times)

  device_count = mesh.devices.size
  matmul = matmul_flops(traced.jaxpr)
  flops, flops_source = step_flops(compiled, lowered, matmul, device_count)
  tflops_per_s = flops / step_seconds / 1e12
  record = {
      "name": name,
      "description": bench_report.CASES[name],
      "model": spec.model,
      "mode": spec.mode,
      "dtype": settings.dtype,
      "param_dtype": "float32",
      "num_params": num_params,
      **work.shapes,
      "batch_size": batch_size,
      "per_device_batch_size": batch_size // device_count,
      "examples_per_s": batch_size / step_seconds,
      "step_time_s": step_seconds,
      "window_step_times_s": times,
      "setup_s": setup_seconds,
      "trace_and_lower_s": trace_seconds,
      "compile_s": compile_seconds,
      "flops_per_example": flops / batch_size,
      "flops_source": flops_source,
      "matmul_flops_per_example": matmul / batch_size,
      "xla_over_matmul_flops": flops / matmul if matmul else None,
      "tflops_per_s": tflops_per_s,
      "tflops_per_s_per_device": tflops_per_s / device_count,
      "peak_tflops_per_device": settings.peak_tflops,
      "mfu": (tflops_per_s / device_count / settings.peak_tflops if settings.peak_tflops else None),
      "memory_per_device_bytes": bench_models.memory_per_device(compiled),
  }
  if spec.mode == "train":
    _, metrics = run(1)
    # A NaN would mean the timed program is not a usable training step.
    record["loss_after_timing"] = float(metrics["loss"])
  return record


def environment(settings: Settings) -> dict[str, Any]:
  return {**bench_models.environment(), "compute_dtype": settings.dtype,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "prng_impl": str(jax.config.jax_default_prng_impl)}


def default_peak(explicit: float | None) -> tuple[float | None, str]:
  """`--peak_tflops` when given; 989 on a GPU; no MFU elsewhere (a CPU has no such datasheet peak)."""
  if explicit is not None:
    return (explicit or None), "--peak_tflops"
  if jax.devices()[0].platform == "gpu":
    return GPU_PEAK_TFLOPS, "default: H100 SXM / H200 dense bf16 datasheet peak"
  return None, "none: not a GPU and no --peak_tflops given"


def run(case_names: Sequence[str], settings: Settings) -> dict[str, Any]:
  """Every case in order; a case that raises is recorded with its error and the rest still run."""
  mesh = parallel.make_mesh()
  report = {"small": settings.small, "environment": environment(settings),
            "settings": dataclasses.asdict(settings), "cases": []}
  env = report["environment"]
  print(f"{env['device_kind']} x{env['device_count']}, jax {env['jax_version']}, flax "
        f"{env['flax_version']}, {settings.dtype} compute; median of {settings.windows} windows of "
        f"{settings.steps} steps; MFU peak: {settings.peak_source}", flush=True)
  for name in case_names:
    try:
      record = run_case(name, settings, mesh)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: keep the others.
      traceback.print_exc()
      record = {"name": name, "description": bench_report.CASES[name],
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
      print(f"{name}: FAILED ({record['error']})", flush=True)
    else:
      mfu = f", MFU {record['mfu'] * 100:.1f}%" if record["mfu"] is not None else ""
      loss = (f", loss {record['loss_after_timing']:.3f}" if "loss_after_timing" in record else "")
      print(f"{name}: {record['examples_per_s']:,.1f} ex/s ({record['step_time_s'] * 1e3:.2f} ms/step, "
            f"B={record['batch_size']}), {record['tflops_per_s']:.3g} TFLOP/s{mfu}, "
            f"compile {record['compile_s']:.1f} s{loss}", flush=True)
    report["cases"].append(record)
  return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  # argparse, not absl flags: bench_models, imported for its workloads, defines absl flags of the
  # same names (--small, --peak_tflops) for its own command line.
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny models and batches: a smoke run")
  parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                      help="compute dtype; params are float32")
  parser.add_argument("--cases", default=",".join(CASE_SPECS),
                      help=f"comma-separated subset of {','.join(CASE_SPECS)}")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per timed window (default 10, 3 with --small)")
  parser.add_argument("--windows", type=int, default=None,
                      help="timed windows; the median is kept (default 5, 3 with --small)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help=f"one device's dense peak TFLOP/s for MFU (default {GPU_PEAK_TFLOPS:g} "
                      "on a GPU, none on a CPU; 0: no MFU)")
  parser.add_argument("--prng_impl", choices=["threefry2x32", "rbg", "unsafe_rbg"], default=None,
                      help="JAX's PRNG for dropout (jax_default_prng_impl); default: JAX's")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="bench_train.json", help="where to write the JSON")
  args = parser.parse_args(argv)
  args.cases = [name for name in args.cases.split(",") if name]
  unknown = sorted(set(args.cases) - set(CASE_SPECS))
  if unknown or not args.cases:
    parser.error(f"--cases: unknown {unknown}; choose from {','.join(CASE_SPECS)}")
  for name in ("steps", "windows"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name}={value}: give at least 1")
  if args.warmup < 1:
    parser.error(f"--warmup={args.warmup}: give at least 1 (the first run of a program is not timed)")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.prng_impl:
    jax.config.update("jax_default_prng_impl", args.prng_impl)
  peak, peak_source = default_peak(args.peak_tflops)
  settings = Settings(small=args.small, dtype=args.dtype, warmup=args.warmup,
                      windows=args.windows or (3 if args.small else 5),
                      steps=args.steps or (3 if args.small else 10), peak_tflops=peak,
                      peak_source=peak_source, seed=args.seed)
  report = run(args.cases, settings)
  if jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
  if any("error" in case for case in report["cases"]):
    sys.exit(1)
  return report


if __name__ == "__main__":
  main()
