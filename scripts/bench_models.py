"""Forward and train-step throughput of the three classifiers: BERT-base, ResNet-152, CLIP-MMBT.

  PYTHONPATH=. python scripts/bench_models.py --peak_tflops=989 --peak_tflops_float32=495 \
      --batch_sizes=32,128 --output=bench_models.json
  PYTHONPATH=. python scripts/bench_models.py --small   # tiny configs: a CPU smoke run

(from the repository root; PYTHONPATH is not needed once the package is pip-installed).

What is timed is what the stages run: `classifier.make_train_step` (the functional step over
`nnx.split` states, with `train_lib.make_optimizer`'s AdamW, clipping and weight-decay mask, dropout
on, BatchNorm in training mode) and `classifier.make_eval_step` (eval mode), jitted with train_lib's
shardings: params and optimizer state replicated (and donated in training), the batch split over
the `data` axis of a mesh over every device. One random batch per size is drawn on the devices,
already sharded, so no host transfer is timed. Each program is compiled once (`lower().compile()`,
timed apart) and that executable is both timed and asked for its cost. Warm-up steps are excluded;
a step time is the median over `--repeats` runs of `--steps_per_repeat` back-to-back steps, each
run ended by `jax.block_until_ready`.

FLOPs are XLA's count for the compiled program (`cost_analysis()`: 2 per multiply-add, including
element-wise work and, in training, the backward pass and the optimizer update). XLA counts one
device's share of the SPMD program, so a step's total is that times the device count, and
MFU = (FLOPs per device per second) / `--peak_tflops`, the dense peak of ONE device for the compute
dtype. float32 rows run matmuls at JAX's default precision, which is TF32 on NVIDIA Ampere and newer
GPUs: give that peak as `--peak_tflops_float32`. Where a backend gives no FLOP count, the FLOP
fields are null rather than guessed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jmmshap import classifier, parallel, train_lib
from jmmshap.models import bert, clip_vision, mmbt, resnet

Batch = dict[str, jax.Array]

MODES = ("forward", "train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_MODELS = flags.DEFINE_list("models", ["bert", "resnet", "mmbt"], "Models to time: bert, resnet, mmbt.")
_MODES = flags.DEFINE_list("modes", list(MODES), "What to time: forward (eval step), train (train step).")
_DTYPES = flags.DEFINE_list("dtypes", list(DTYPES), "Compute dtypes; params are always float32.")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", [], "Global batch sizes, multiples of the device count. Default: 32,128, or with "
    "--small twice the device count.")
_SMALL = flags.DEFINE_bool("small", False, "Tiny configs, images and sequences: a quick CPU check.")
_BERT_LENGTH = flags.DEFINE_integer("bert_length", 128, "BERT's sequence length (tokens).")
_RESNET_IMAGE_SIZE = flags.DEFINE_integer("resnet_image_size", 224, "ResNet-152's image side (px).")
_MMBT_IMAGE_SIZE = flags.DEFINE_integer(
    "mmbt_image_size", 224, "CLIP ViT-B/32 image side in MMBT (px, multiple of 32); the paper used 288.")
_MMBT_TEXT_LENGTH = flags.DEFINE_integer(
    "mmbt_text_length", 120, "MMBT's text tokens; the joint sequence adds [CLS] images [SEP].")
_NUM_LABELS = flags.DEFINE_integer("num_labels", 10, "Classes of the classification heads.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "Dense peak TFLOP/s of one device for bfloat16 compute; 0 leaves MFU out.")
_PEAK_TFLOPS_FLOAT32 = flags.DEFINE_float(
    "peak_tflops_float32", None, "Dense peak TFLOP/s of one device for float32 rows (TF32 on NVIDIA "
    "Ampere+ GPUs); defaults to --peak_tflops.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement; the median is kept.")
_STEPS_PER_REPEAT = flags.DEFINE_integer("steps_per_repeat", 5, "Back-to-back steps in one timed run.")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and batches.")
_OUTPUT = flags.DEFINE_string("output", "bench_models.json", "Where to write the JSON results.")

for _flag, _choices in ((_MODELS, ("bert", "resnet", "mmbt")), (_MODES, MODES), (_DTYPES, DTYPES)):
  flags.register_validator(
      _flag.name, lambda values, choices=_choices: bool(values) and set(values) <= set(choices),
      message=f"--{_flag.name}: give a comma-separated subset of {','.join(_choices)}")
flags.register_validator(
    _BATCH_SIZES.name, lambda values: all(v.isdigit() and int(v) > 0 for v in values),
    message="--batch_sizes: give positive integers, e.g. --batch_sizes=32,128")


# ---------------------------------------------------------------------------------------------------
# The models and their random batches.


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Input sizes shared by the model factories; `small` swaps every model for a tiny config."""
  small: bool
  bert_length: int
  resnet_image_size: int
  mmbt_image_size: int
  mmbt_text_length: int
  num_labels: int


@dataclasses.dataclass(frozen=True)
class Workload:
  """How to build a model at a compute dtype, the batch keys it reads, and its random batches."""
  build: Callable[[Any, nnx.Rngs], nnx.Module]  # (compute dtype, rngs) -> float32-param model.
  inputs: tuple[str, ...]
  make_batch: Callable[[jax.Array, int], Batch]  # (key, batch size) -> batch without labels.
  shapes: dict[str, Any]  # What one example is, for the report.


def _token_batch(key: jax.Array, batch_size: int, length: int, vocab_size: int) -> Batch:
  # No padding: every position is attended, the sequence length is the work done.
  shape = (batch_size, length)
  return {"input_ids": jax.random.randint(key, shape, 0, vocab_size, jnp.int32),
          "attention_mask": jnp.ones(shape, jnp.int32),
          "token_type_ids": jnp.zeros(shape, jnp.int32)}


def _pixel_batch(key: jax.Array, batch_size: int, image_size: int) -> Batch:
  # float32 NHWC, as input_pipeline.Preprocessor feeds them; the model casts to its compute dtype.
  shape = (batch_size, image_size, image_size, 3)
  return {"pixel_values": jax.random.normal(key, shape, jnp.float32)}


def _one_layer(config: bert.BertConfig) -> bert.BertConfig:
  # XLA:CPU compile time grows with the layer count; one layer already runs every kind of op.
  return dataclasses.replace(config, num_hidden_layers=1)


def bert_workload(sizes: Sizes) -> Workload:
  """BERT-base (tiny with --small) sequence classification, as the text stage trains it."""
  config = _one_layer(bert.BertConfig.tiny()) if sizes.small else bert.BertConfig.base()
  length = 16 if sizes.small else sizes.bert_length
  return Workload(
      lambda dtype, rngs: bert.BertForSequenceClassification(config, sizes.num_labels, dtype=dtype,
                                                             rngs=rngs),
      ("input_ids", "attention_mask", "token_type_ids"),
      lambda key, batch_size: _token_batch(key, batch_size, length, config.vocab_size),
      {"sequence_length": length, "hidden_size": config.hidden_size,
       "num_layers": config.num_hidden_layers})


def resnet_workload(sizes: Sizes) -> Workload:
  """ResNet-152 with the standard 7x7/2 stem and max-pool (two bottleneck stages with --small)."""
  if sizes.small:
    config = resnet.ResNetConfig(depths=(1, 1), layer_type="bottleneck", hidden_sizes=(32, 64),
                                 embedding_size=16)
    image_size = 32
  else:
    config = resnet.ResNetConfig(depth=152)
    image_size = sizes.resnet_image_size
  return Workload(
      lambda dtype, rngs: resnet.ResNet(config, num_labels=sizes.num_labels, dtype=dtype, rngs=rngs),
      ("pixel_values",),
      lambda key, batch_size: _pixel_batch(key, batch_size, image_size),
      {"image_size": image_size, "depth": config.depth})


def mmbt_workload(sizes: Sizes) -> Workload:
  """CLIP-MMBT: ViT-B/32 image tower, 4 image embeddings, BERT-base over them and the text."""
  mmbt_config = mmbt.MMBTConfig()
  if sizes.small:
    text_config = _one_layer(bert.BertConfig.tiny(vocab_size=128))  # Holds [CLS]/[SEP]/[MASK] ids.
    vision_config = clip_vision.CLIPVisionConfig(hidden_size=32, intermediate_size=37,
                                                 num_hidden_layers=1, num_attention_heads=4,
                                                 image_size=64, patch_size=16)
    text_length = 12
  else:
    text_config = bert.BertConfig.base()
    vision_config = clip_vision.CLIPVisionConfig(image_size=sizes.mmbt_image_size)
    text_length = sizes.mmbt_text_length
  image_size = vision_config.image_size

  def build(dtype: Any, rngs: nnx.Rngs) -> mmbt.MMBT:
    text = bert.BertModel(text_config, dtype=dtype, rngs=rngs)
    vision = clip_vision.CLIPVisionModel(vision_config, dtype=dtype, rngs=rngs)
    return mmbt.MMBT(mmbt_config, text, vision, sizes.num_labels, dtype=dtype, rngs=rngs)

  def make_batch(key: jax.Array, batch_size: int) -> Batch:
    text_key, image_key = jax.random.split(key)
    return {**_token_batch(text_key, batch_size, text_length, text_config.vocab_size),
            **_pixel_batch(image_key, batch_size, image_size)}

  # The text's own [CLS] is replaced by the image segment's [CLS] img_1..img_N [SEP].
  joint_length = text_length - 1 + mmbt_config.num_image_embeddings + 2
  return Workload(
      build, ("input_ids", "attention_mask", "token_type_ids", "pixel_values"), make_batch,
      {"text_length": text_length, "image_size": image_size,
       "patch_size": vision_config.patch_size,
       "num_image_embeddings": mmbt_config.num_image_embeddings,
       "joint_sequence_length": joint_length})


MODEL_FACTORIES: dict[str, Callable[[Sizes], Workload]] = {
    "bert": bert_workload,
    "resnet": resnet_workload,
    "mmbt": mmbt_workload,
}


def random_batch(workload: Workload, batch_size: int, num_labels: int, seed: int,
                 mesh: jax.sharding.Mesh) -> Batch:
  """A batch drawn directly on the devices, already split over the data axis."""

  def draw(key: jax.Array) -> Batch:
    input_key, label_key = jax.random.split(key)
    return {**workload.make_batch(input_key, batch_size),
            "label": jax.random.randint(label_key, (batch_size,), 0, num_labels, jnp.int32)}

  return jax.jit(draw, out_shardings=parallel.data_sharded(mesh))(jax.random.key(seed))


# ---------------------------------------------------------------------------------------------------
# Timing.


def seconds_per_step(run_steps: Callable[[int], Any], warmup_steps: int, repeats: int,
                     steps_per_repeat: int) -> list[float]:
  """Per-step seconds of each timed run; `run_steps(n)` dispatches n steps and returns their outputs."""
  jax.block_until_ready(run_steps(warmup_steps))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run_steps(steps_per_repeat))
    times.append((time.perf_counter() - start) / steps_per_repeat)
  return times


def xla_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
  """XLA's FLOP count: of the whole program for a Lowered, of one device's share for a Compiled.

  None when the backend gives no count.
  """
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_per_device(compiled: Any) -> dict[str, int] | None:
  """Bytes of arguments, outputs and temporaries one device holds while the program runs."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return None
  if stats is None:
    return None
  return {name: int(getattr(stats, f"{name}_size_in_bytes"))
          for name in ("argument", "output", "alias", "temp")}


def compile_forward(model: nnx.Module, inputs: tuple[str, ...], batch: Batch,
                    mesh: jax.sharding.Mesh, compiler_options: dict[str, Any] | None
                    ) -> tuple[jax.stages.Lowered, jax.stages.Compiled, Callable[[int], Any]]:
  """The eval step over eval-mode states: (compiled program, run_steps)."""
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  replicated = parallel.replicated(mesh)
  params, model_state = jax.device_put((nnx.as_pure(params), nnx.as_pure(model_state)), replicated)
  eval_step = jax.jit(classifier.make_eval_step(graphdef, inputs),
                      in_shardings=(replicated, replicated, parallel.data_sharded(mesh)),
                      out_shardings=parallel.data_sharded(mesh))
  lowered = eval_step.lower(params, model_state, batch)
  compiled = lowered.compile(compiler_options)

  def run_steps(count: int) -> list[jax.Array]:
    return [compiled(params, model_state, batch) for _ in range(count)]

  return lowered, compiled, run_steps


def compile_train(model: nnx.Module, inputs: tuple[str, ...], batch: Batch,
                  mesh: jax.sharding.Mesh, compiler_options: dict[str, Any] | None
                  ) -> tuple[jax.stages.Lowered, jax.stages.Compiled, Callable[[int], Any]]:
  """train_lib's train step with AdamW over train-mode states: (compiled program, run_steps)."""
  model.train()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  optimizer_config = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, weight_decay=0.01, warmup_fraction=0.1, schedule="cosine",
      grad_clip_norm=1.0))  # configs/mmbt.py's optimizer.
  optimizer, _ = train_lib.make_optimizer(optimizer_config, total_steps=10_000)
  replicated = parallel.replicated(mesh)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": optimizer.init(params)}
  # A copy: the step donates its state, which must not free the model's own arrays.
  state = jax.device_put(state, replicated, may_alias=False)
  step = jax.jit(classifier.make_train_step(graphdef, inputs, optimizer),
                 in_shardings=(replicated, parallel.data_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  lowered = step.lower(state, batch)
  compiled = lowered.compile(compiler_options)

  def run_steps(count: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    nonlocal state
    metrics = {}
    for _ in range(count):
      state, metrics = compiled(state, batch)
    return state, metrics

  return lowered, compiled, run_steps


STEP_COMPILERS: dict[str, Callable[..., tuple[jax.stages.Lowered, jax.stages.Compiled,
                                               Callable[[int], Any]]]] = {
    "forward": compile_forward,
    "train": compile_train,
}


def benchmark(model: nnx.Module, inputs: tuple[str, ...], mode: str, batch: Batch,
              peak_tflops: float | None, mesh: jax.sharding.Mesh,
              compiler_options: dict[str, Any] | None) -> dict[str, Any]:
  """One row of the report: times, throughput, FLOPs, MFU and memory of one (mode, batch size)."""
  batch_size = batch["label"].shape[0]
  start = time.perf_counter()
  lowered, compiled, run_steps = STEP_COMPILERS[mode](model, inputs, batch, mesh, compiler_options)
  compile_seconds = time.perf_counter() - start
  times = seconds_per_step(run_steps, _WARMUP_STEPS.value, _REPEATS.value, _STEPS_PER_REPEAT.value)
  step_seconds = statistics.median(times)
  device_count = mesh.devices.size
  device_flops = xla_flops(compiled)
  row = {
      "mode": mode,
      "batch_size": batch_size,
      "per_device_batch_size": batch_size // device_count,
      "setup_and_compile_s": compile_seconds,
      "step_time_s": step_seconds,
      "step_time_min_s": min(times),
      "step_times_s": times,
      "examples_per_s": batch_size / step_seconds,
      "flops_per_step": None if device_flops is None else device_flops * device_count,
      # The same count on the program before XLA's optimisation and partitioning: a cross-check
      # for backends whose library calls (cuDNN, cuBLAS) the compiled count might miss.
      "flops_per_step_before_optimization": xla_flops(lowered),
      "tflops_per_s": None,
      "tflops_per_s_per_device": None,
      "peak_tflops_per_device": peak_tflops,
      "mfu": None,
      "memory_per_device_bytes": memory_per_device(compiled),
  }
  if device_flops is not None:
    per_device = device_flops / step_seconds / 1e12
    row["tflops_per_s"] = per_device * device_count
    row["tflops_per_s_per_device"] = per_device
    if peak_tflops:
      row["mfu"] = per_device / peak_tflops
  if mode == "train":
    _, metrics = run_steps(1)
    # A NaN here would mean the timed program is not a usable training step.
    row["loss_after_timing"] = float(metrics["loss"])
  return row


# ---------------------------------------------------------------------------------------------------
# The run.


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "jaxlib_version": importlib.metadata.version("jaxlib"),
      "flax_version": flax.__version__,
      "optax_version": optax.__version__,
      "python": platform.python_version(),
      "default_matmul_precision": jax.config.jax_default_matmul_precision,
      "command": " ".join(sys.argv),
  }


def _format_row(model: str, dtype: str, row: dict[str, Any]) -> str:
  line = (f"{model:6s} {row['mode']:7s} {dtype:8s} batch {row['batch_size']:4d}: "
          f"{row['step_time_s'] * 1e3:9.2f} ms/step {row['examples_per_s']:10.1f} ex/s")
  if row["tflops_per_s"] is not None:
    line += f" {row['tflops_per_s']:9.3g} TFLOP/s"
  if row["mfu"] is not None:
    line += f"  MFU {row['mfu'] * 100:5.1f}%"
  if "loss_after_timing" in row:
    line += f"  loss {row['loss_after_timing']:.3f}"
  return line


def main(argv: list[str]) -> None:
  del argv
  small = _SMALL.value
  mesh = parallel.make_mesh()
  device_count = jax.device_count()
  batch_sizes = ([int(b) for b in _BATCH_SIZES.value] if _BATCH_SIZES.value
                 else [2 * device_count] if small else [32, 128])
  for batch_size in batch_sizes:
    try:
      parallel.check_batch_size(batch_size, "--batch_sizes")
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  sizes = Sizes(small=small, bert_length=_BERT_LENGTH.value,
                resnet_image_size=_RESNET_IMAGE_SIZE.value, mmbt_image_size=_MMBT_IMAGE_SIZE.value,
                mmbt_text_length=_MMBT_TEXT_LENGTH.value, num_labels=_NUM_LABELS.value)
  peaks = {"bfloat16": _PEAK_TFLOPS.value or None,
           "float32": (_PEAK_TFLOPS_FLOAT32.value if _PEAK_TFLOPS_FLOAT32.value is not None
                       else _PEAK_TFLOPS.value) or None}

  # XLA:CPU spends ~10 s optimising even a tiny train step; the smoke run needs programs that run,
  # not fast ones, so it skips the backend optimisations (the FLOP count is the same).
  compiler_options = {"xla_backend_optimization_level": 0} if small else None
  report = {**environment(), "small": small, "compiler_options": compiler_options,
            "repeats": _REPEATS.value,
            "steps_per_repeat": _STEPS_PER_REPEAT.value, "warmup_steps": _WARMUP_STEPS.value,
            "num_labels": sizes.num_labels, "results": []}
  print(f"{report['device_kind']} x{device_count}, jax {report['jax_version']}, flax "
        f"{report['flax_version']}; median of {_REPEATS.value} runs of {_STEPS_PER_REPEAT.value} steps")
  for model_name in _MODELS.value:
    workload = MODEL_FACTORIES[model_name](sizes)
    # The same inputs for every dtype and mode of a model.
    batches = {batch_size: random_batch(workload, batch_size, sizes.num_labels, _SEED.value, mesh)
               for batch_size in batch_sizes}
    for dtype_name in _DTYPES.value:
      model = workload.build(DTYPES[dtype_name], nnx.Rngs(_SEED.value))
      num_params = bert.count_params(model)
      for batch_size, batch in batches.items():
        for mode in _MODES.value:
          row = benchmark(model, workload.inputs, mode, batch, peaks[dtype_name], mesh,
                          compiler_options)
          row = {"model": model_name, "dtype": dtype_name, "param_dtype": "float32",
                 "num_params": num_params, **workload.shapes, **row}
          report["results"].append(row)
          print(_format_row(model_name, dtype_name, row), flush=True)
      del model
    del batches

  if jax.process_index() == 0:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
