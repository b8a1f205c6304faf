r"""PyTorch baselines of issue #7 at bench_train.py's settings, timed the same way, on one GPU.

  python scripts/bench_torch.py --out=torch.json              # a CUDA GPU (bench_gpu.sh runs this)
  python scripts/bench_torch.py --small --out=/tmp/torch.json  # tiny models; on the CPU without a GPU

Cases (`bench_report.TORCH_CASES`):
  bert_train_b64, bert_train_b256   transformers BertForSequenceClassification (BERT-base, random
                                    init), L = 128: forward, cross-entropy, backward, global-norm
                                    clipping at 1.0, torch.optim.AdamW (weight decay on matrices only,
                                    as train_lib masks it), zero_grad; dropout on
  resnet152_train_b128              torchvision resnet152, 224 px, channels-last model and inputs,
                                    the same loss and optimizer; cudnn.benchmark on
  clip_vit_b32_forward_b1024        transformers CLIPVisionModel with a ViT-B/32 config (random init,
                                    nothing downloaded), pooled output, 224 px
  bert_forward_b1024                BertForSequenceClassification logits, L = 128, B = 1024
  bert_forward_b1_per_call          the same model, one input per call with its logits read back to
                                    the host each time: the public MM-SHAP reference's game loop

Compute: bf16 autocast (float32 params) with `--dtype=bfloat16`; with float32, TF32 matmuls
(`torch.set_float32_matmul_precision("high")`), the precision JAX's default uses on NVIDIA GPUs.
Eager mode, no torch.compile; the learning-rate schedule of the JAX step is left out (scalar work).
Inputs are random tensors made once on the device. After `--warmup` steps, `--windows` windows of
`--steps` steps are timed, each ended by one `torch.cuda.synchronize()`; a step's time is the median
window's time / `--steps`. Forward cases run under `torch.inference_mode()`.

Torch is imported only here, never by the library. Without torch or transformers, or without a
CUDA device for a full-size run, every case is recorded as skipped with the reason (exit status 0);
without torchvision only the ResNet case is. A case that raises is recorded with its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import bench_report  # scripts/bench_report.py: the case names shared with bench_train.py.

NUM_LABELS = 10
TRAIN_CASES = ("bert_train_b64", "bert_train_b256", "resnet152_train_b128")
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP_NORM = 1e-4, 0.01, 1.0  # bench_train's optimizer.


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Model configs and batches of a run: full size, or tiny with --small (bench_train's tiny sizes)."""
  bert: dict[str, Any]
  sequence_length: int
  clip: dict[str, Any]
  resnet_blocks: tuple[int, ...] | None  # None: torchvision's resnet152.
  image_size: int
  batch_sizes: dict[str, int]


def sizes(small: bool) -> Sizes:
  if small:
    return Sizes(
        bert=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64),
        sequence_length=16,
        clip=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=8),
        resnet_blocks=(1, 1, 1, 1), image_size=32,
        batch_sizes={"bert_train_b64": 8, "bert_train_b256": 16, "resnet152_train_b128": 8,
                     "clip_vit_b32_forward_b1024": 32, "bert_forward_b1024": 32,
                     bench_report.BERT_FORWARD_PER_CALL: 1})
  return Sizes(
      bert=dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=512),
      sequence_length=128,
      clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu"),
      resnet_blocks=None, image_size=224,
      batch_sizes={"bert_train_b64": 64, "bert_train_b256": 256, "resnet152_train_b128": 128,
                   "clip_vit_b32_forward_b1024": 1024, "bert_forward_b1024": 1024,
                   bench_report.BERT_FORWARD_PER_CALL: 1})


@dataclasses.dataclass(frozen=True)
class Settings:
  small: bool = False
  dtype: str = "bfloat16"
  warmup: int = 2
  windows: int = 5
  steps: int = 10
  calls_per_window: int = 100  # bert_forward_b1_per_call: forward calls per timed window.
  seed: int = 0


class Skip(Exception):
  """A case that cannot run here (a missing package or device); recorded with its reason."""


# ---------------------------------------------------------------------------------------------------
# Timing.


def time_windows(step: Callable[[], Any], synchronize: Callable[[], None], warmup: int,
                 windows: int, steps: int) -> list[float]:
  """Per-step seconds of each window of `steps` back-to-back steps, synchronised at its end only."""
  for _ in range(warmup):
    step()
  synchronize()
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    synchronize()
    times.append((time.perf_counter() - start) / steps)
  return times


# ---------------------------------------------------------------------------------------------------
# The cases.


class Bench:
  """Builds and times the cases on one torch device."""

  def __init__(self, torch: Any, transformers: Any, device: Any, settings: Settings):
    self.torch, self.transformers, self.device, self.settings = torch, transformers, device, settings
    self.sizes = sizes(settings.small)
    self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)

  def synchronize(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize(self.device)

  def autocast(self):
    enabled = self.settings.dtype == "bfloat16"
    return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=enabled)

  def _tokens(self, batch_size: int) -> dict[str, Any]:
    torch, length = self.torch, self.sizes.sequence_length
    shape = (batch_size, length)
    input_ids = torch.randint(0, self.sizes.bert["vocab_size"], shape, generator=self.generator)
    return {"input_ids": input_ids.to(self.device),
            "attention_mask": torch.ones(shape, dtype=torch.long, device=self.device),
            "token_type_ids": torch.zeros(shape, dtype=torch.long, device=self.device)}

  def _pixels(self, batch_size: int, channels_last: bool = False) -> Any:
    size = self.sizes.image_size
    pixels = self.torch.randn((batch_size, 3, size, size), generator=self.generator).to(self.device)
    return pixels.contiguous(memory_format=self.torch.channels_last) if channels_last else pixels

  def _labels(self, batch_size: int) -> Any:
    return self.torch.randint(0, NUM_LABELS, (batch_size,), generator=self.generator).to(self.device)

  def bert(self) -> Any:
    config = self.transformers.BertConfig(**self.sizes.bert, num_labels=NUM_LABELS)
    return self.transformers.BertForSequenceClassification(config).to(self.device)

  def resnet(self) -> Any:
    try:
      models = importlib.import_module("torchvision.models")
    except ImportError as e:
      raise Skip(f"torchvision does not import ({e})") from e
    if self.sizes.resnet_blocks is None:
      model = models.resnet152(weights=None, num_classes=NUM_LABELS)
    else:
      model = models.resnet.ResNet(models.resnet.Bottleneck, list(self.sizes.resnet_blocks),
                                   num_classes=NUM_LABELS)
    return model.to(self.device, memory_format=self.torch.channels_last)

  def clip_vision(self) -> Any:
    config = self.transformers.CLIPVisionConfig(**self.sizes.clip)
    return self.transformers.CLIPVisionModel(config).to(self.device)

  def _optimizer(self, model: Any) -> Any:
    # train_lib decays matrices only (ndim > 1), not biases or norm scales.
    parameters = list(model.parameters())
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    return self.torch.optim.AdamW(groups, lr=LEARNING_RATE)

  def _train_step(self, model: Any, forward: Callable[[], Any], labels: Any) -> Callable[[], Any]:
    torch, optimizer = self.torch, self._optimizer(model)
    model.train()

    def step():
      with self.autocast():
        logits = forward()
      loss = torch.nn.functional.cross_entropy(logits.float(), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss.detach()

    return step

  def _forward_step(self, model: Any, forward: Callable[[], Any]) -> Callable[[], Any]:
    model.eval()

    def step():
      with self.torch.inference_mode(), self.autocast():
        return forward()

    return step

  def build(self, name: str) -> tuple[Any, Callable[[], Any], int]:
    """(model, one step, examples per step) of a case."""
    batch_size = self.sizes.batch_sizes[name]
    if name in ("bert_train_b64", "bert_train_b256"):
      model, inputs = self.bert(), self._tokens(batch_size)
      return model, self._train_step(model, lambda: model(**inputs).logits,
                                     self._labels(batch_size)), batch_size
    if name == "resnet152_train_b128":
      model, pixels = self.resnet(), self._pixels(batch_size, channels_last=True)
      return model, self._train_step(model, lambda: model(pixels), self._labels(batch_size)), batch_size
    if name == "clip_vit_b32_forward_b1024":
      model, pixels = self.clip_vision(), self._pixels(batch_size)
      return model, self._forward_step(model, lambda: model(pixel_values=pixels).pooler_output), batch_size
    if name == "bert_forward_b1024":
      model, inputs = self.bert(), self._tokens(batch_size)
      return model, self._forward_step(model, lambda: model(**inputs).logits), batch_size
    if name == bench_report.BERT_FORWARD_PER_CALL:
      model = self.bert()
      inputs = self._tokens(self.settings.calls_per_window)
      rows = [{key: value[i:i + 1] for key, value in inputs.items()}
              for i in range(self.settings.calls_per_window)]
      model.eval()

      def window():  # One call per input, each read back as the reference's loop reads it.
        with self.torch.inference_mode(), self.autocast():
          return [model(**row).logits.float().cpu() for row in rows]

      return model, window, self.settings.calls_per_window
    raise ValueError(f"unknown case {name!r}")

  def run_case(self, name: str) -> dict[str, Any]:
    torch, settings = self.torch, self.settings
    start = time.perf_counter()
    model, step, examples_per_step = self.build(name)
    setup_seconds = time.perf_counter() - start
    per_call = name == bench_report.BERT_FORWARD_PER_CALL
    # A per-call window already holds `calls_per_window` calls: time one per window.
    steps = 1 if per_call else settings.steps
    start = time.perf_counter()
    step()
    self.synchronize()
    first_step_seconds = time.perf_counter() - start
    times = time_windows(step, self.synchronize, max(settings.warmup - 1, 0), settings.windows, steps)
    if per_call:
      times = [seconds / examples_per_step for seconds in times]  # Seconds per call.
    step_seconds = statistics.median(times)
    record = {
        "name": name,
        "description": bench_report.TORCH_CASES[name],
        "batch_size": 1 if per_call else examples_per_step,
        "examples_per_s": (1 if per_call else examples_per_step) / step_seconds,
        "step_time_s": step_seconds,
        "window_step_times_s": times,
        "setup_s": setup_seconds,
        "first_step_s": first_step_seconds,
        "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": settings.dtype,
        "attention_implementation": getattr(getattr(model, "config", None), "_attn_implementation",
                                            None),
    }
    if name in TRAIN_CASES:
      record["loss_after_timing"] = float(step())
    del model, step
    if self.device.type == "cuda":
      torch.cuda.empty_cache()
    return record


# ---------------------------------------------------------------------------------------------------
# The run.


def _versions(torch: Any, transformers: Any, device: Any) -> dict[str, Any]:
  try:
    torchvision_version = importlib.import_module("torchvision").__version__
  except ImportError:
    torchvision_version = None
  cuda = device.type == "cuda"
  return {
      "device": str(device),
      "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
      "device_count_used": 1,
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "torchvision_version": torchvision_version,
      "cuda_version": torch.version.cuda,
      "cudnn_version": torch.backends.cudnn.version() if cuda else None,
      "cudnn_benchmark": torch.backends.cudnn.benchmark,
      "float32_matmul_precision": torch.get_float32_matmul_precision(),
      "python": platform.python_version(),
      "command": " ".join(sys.argv),
  }


def run(case_names: Sequence[str], settings: Settings) -> dict[str, Any]:
  """Every case, each measured, skipped (with why) or failed (with the error)."""
  report = {"small": settings.small, "settings": dataclasses.asdict(settings), "environment": None,
            "cases": []}

  def skip_all(reason: str) -> dict[str, Any]:
    print(f"bench_torch: skipping every case: {reason}", flush=True)
    report["cases"] = [{"name": name, "description": bench_report.TORCH_CASES[name],
                        "skipped": reason} for name in case_names]
    return report

  try:
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
  except ImportError as e:
    return skip_all(f"{e.name} is not installed")
  if torch.cuda.is_available():
    device = torch.device("cuda", 0)
  elif settings.small:
    device = torch.device("cpu")
  else:
    return skip_all("no CUDA device: full-size baselines need a GPU (--small runs on the CPU)")
  torch.manual_seed(settings.seed)
  torch.backends.cudnn.benchmark = True
  if settings.dtype == "float32":
    torch.set_float32_matmul_precision("high")
  report["environment"] = _versions(torch, transformers, device)
  print(f"torch {torch.__version__} on {report['environment']['device_name']}, {settings.dtype}; "
        f"median of {settings.windows} windows of {settings.steps} steps", flush=True)
  bench = Bench(torch, transformers, device, settings)
  for name in case_names:
    try:
      record = bench.run_case(name)
    except Skip as e:
      record = {"name": name, "description": bench_report.TORCH_CASES[name], "skipped": str(e)}
      print(f"{name}: skipped ({e})", flush=True)
    except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: keep the others.
      traceback.print_exc()
      record = {"name": name, "description": bench_report.TORCH_CASES[name],
                "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
      print(f"{name}: FAILED ({record['error']})", flush=True)
    else:
      print(f"{name}: {record['examples_per_s']:,.1f} ex/s "
            f"({record['step_time_s'] * 1e3:.2f} ms/step, B={record['batch_size']})", flush=True)
    report["cases"].append(record)
  return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny models; runs on the CPU without a GPU")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="bfloat16: bf16 autocast over float32 params; float32: TF32 matmuls")
  parser.add_argument("--cases", default=",".join(bench_report.TORCH_CASES),
                      help=f"comma-separated subset of {','.join(bench_report.TORCH_CASES)}")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per timed window (default 10, 3 with --small)")
  parser.add_argument("--windows", type=int, default=None,
                      help="timed windows; the median is kept (default 5, 3 with --small)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps, the first included")
  parser.add_argument("--calls_per_window", type=int, default=None,
                      help="one-input calls per window of bert_forward_b1_per_call (default 100, 8 "
                      "with --small)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="bench_torch.json", help="where to write the JSON")
  args = parser.parse_args(argv)
  args.cases = [name for name in args.cases.split(",") if name]
  unknown = sorted(set(args.cases) - set(bench_report.TORCH_CASES))
  if unknown or not args.cases:
    parser.error(f"--cases: unknown {unknown}; choose from {','.join(bench_report.TORCH_CASES)}")
  for name in ("steps", "windows", "warmup", "calls_per_window"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name}={value}: give at least 1")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  settings = Settings(small=args.small, dtype=args.dtype, warmup=args.warmup,
                      windows=args.windows or (3 if args.small else 5),
                      steps=args.steps or (3 if args.small else 10),
                      calls_per_window=args.calls_per_window or (8 if args.small else 100),
                      seed=args.seed)
  report = run(args.cases, settings)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {args.out}")
  if any("error" in case for case in report["cases"]):
    sys.exit(1)
  return report


if __name__ == "__main__":
  main()
