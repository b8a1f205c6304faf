r"""Merges the issue #7 benchmarks into one JSON: JAX vs PyTorch per case, the goals, pass or fail.

  python scripts/bench_report.py --train=OUT/train.json --mmshap=OUT/mmshap.json \
      --torch=OUT/torch.json --nvidia_smi=OUT/nvidia_smi.csv --out=OUT/report.json

`scripts/bench_gpu.sh` runs it after bench_train.py, bench_mmshap.py and bench_torch.py. A missing
input file is reported as not run, never skipped silently. Prints a markdown summary to stdout.

Goals compare numbers from the same call on the same machine: a ratio goal whose PyTorch baseline
was not measured (no torch, no GPU) is "not measured", not judged against the issue's published
H200 baselines. Runs with `--small` (tiny models, a smoke test of the scripts) judge no goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

# The cases bench_train.py (JAX) and bench_torch.py (PyTorch) both time, by the name both use.
CASES = {
    "bert_train_b64": "BERT-base sequence classification, train step, L=128, B=64",
    "bert_train_b256": "BERT-base sequence classification, train step, L=128, B=256",
    "resnet152_train_b128": "ResNet-152 train step, 224 px, B=128",
    "clip_vit_b32_forward_b1024": "CLIP ViT-B/32 vision forward, 224 px, B=1024",
    "bert_forward_b1024": "BERT-base sequence classification forward, L=128, B=1024",
}
# PyTorch only: the public MM-SHAP reference's pattern, one input per forward call.
BERT_FORWARD_PER_CALL = "bert_forward_b1_per_call"
TORCH_CASES = {**CASES,
               BERT_FORWARD_PER_CALL: "BERT-base forward, L=128, one input per call, logits read back"}

MMSHAP_GOAL_PLAYERS = 16

PASS, FAIL, NOT_MEASURED, SMOKE = "pass", "FAIL", "not measured", "n/a (--small smoke run)"


def _case(results: dict | None, name: str) -> dict | None:
  """A measured case (one with examples_per_s) of bench_train's or bench_torch's JSON, else None."""
  for case in (results or {}).get("cases", []):
    if case.get("name") == name and case.get("examples_per_s"):
      return case
  return None


def _rate(results: dict | None, name: str) -> float | None:
  case = _case(results, name)
  return case["examples_per_s"] if case else None


def _mmshap_row(mmshap: dict | None, num_players: int | None = None) -> dict | None:
  """bench_mmshap's row at `num_players`, or its largest game when None."""
  rows = (mmshap or {}).get("results", [])
  if num_players is not None:
    rows = [row for row in rows if row["num_players"] == num_players]
  return max(rows, key=lambda row: row["num_players"]) if rows else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
  return numerator / denominator if numerator and denominator else None


@dataclasses.dataclass(frozen=True)
class Goal:
  """One target of issue #7: `value(train, mmshap, torch)` compared with `threshold`."""
  name: str
  value: Callable[[dict | None, dict | None, dict | None], float | None]
  threshold: float
  unit: str
  at_most: bool = False  # True: the value must not exceed the threshold (a time).

  def judge(self, value: float | None, small: bool) -> str:
    if small:
      return SMOKE
    if value is None:
      return NOT_MEASURED
    return PASS if (value <= self.threshold if self.at_most else value >= self.threshold) else FAIL


def _mmshap_rate(train, mmshap, torch) -> float | None:
  del train, torch
  row = _mmshap_row(mmshap)
  return row["engine_coalitions_per_s"] if row else None


def _mmshap_seconds_p16(train, mmshap, torch) -> float | None:
  del train, torch
  row = _mmshap_row(mmshap, MMSHAP_GOAL_PLAYERS)
  return row["engine_seconds_per_example"] if row else None


GOALS = (
    Goal("BERT-base fine-tuning, L=128, B=64",
         lambda train, mmshap, torch: _rate(train, "bert_train_b64"), 2900, "examples/s"),
    Goal("BERT-base fine-tuning, L=128, B=256",
         lambda train, mmshap, torch: _rate(train, "bert_train_b256"), 6000, "examples/s"),
    Goal("ResNet-152 training, 224 px, B=128",
         lambda train, mmshap, torch: _rate(train, "resnet152_train_b128"), 2400, "images/s"),
    Goal("MM-SHAP exact coalition evaluations, BERT-base size, L=128 (largest p timed)",
         _mmshap_rate, 25000, "coalitions/s"),
    Goal("MM-SHAP coalitions/s over batched PyTorch BERT-base forward (B=1024)",
         lambda train, mmshap, torch: _ratio(_mmshap_rate(train, mmshap, torch),
                                             _rate(torch, "bert_forward_b1024")), 1.6, "x"),
    Goal("MM-SHAP coalitions/s over PyTorch one-input-per-call forward",
         lambda train, mmshap, torch: _ratio(_mmshap_rate(train, mmshap, torch),
                                             _rate(torch, BERT_FORWARD_PER_CALL)), 100, "x"),
    Goal(f"MM-SHAP, one example, p={MMSHAP_GOAL_PLAYERS} ({2 ** MMSHAP_GOAL_PLAYERS:,} coalitions)",
         _mmshap_seconds_p16, 3.0, "s", at_most=True),
)


def merge(train: dict | None, mmshap: dict | None, torch: dict | None,
          nvidia_smi: str | None = None) -> dict[str, Any]:
  """One report from the three scripts' JSON (None: that script did not run or wrote nothing)."""
  sizes = {name: bool(results.get("small"))
           for name, results in (("train", train), ("mmshap", mmshap), ("torch", torch))
           if results is not None}
  if len({value for value in sizes.values() if value is not None}) > 1:
    raise ValueError(f"bench_report: the inputs mix --small and full-size runs ({sizes}); rerun "
                     "them with the same --small setting.")
  small = any(sizes.values())
  # PyTorch runs on one device; JAX shards the batch over every device of the machine.
  jax_devices = (_environment(train) or {}).get("device_count") or 1
  cases = []
  for name, description in TORCH_CASES.items():
    jax_case, torch_case = _case(train, name), _case(torch, name)
    row = {"name": name, "description": description,
           "jax_examples_per_s": jax_case["examples_per_s"] if jax_case else None,
           "torch_examples_per_s": torch_case["examples_per_s"] if torch_case else None,
           "jax_over_torch": _ratio(jax_case and jax_case["examples_per_s"],
                                    torch_case and torch_case["examples_per_s"]),
           "jax_over_torch_per_device": _ratio(jax_case and jax_case["examples_per_s"] / jax_devices,
                                               torch_case and torch_case["examples_per_s"]),
           "jax_mfu": jax_case.get("mfu") if jax_case else None,
           "jax_tflops_per_s": jax_case.get("tflops_per_s") if jax_case else None,
           "jax_flops_source": jax_case.get("flops_source") if jax_case else None,
           "jax_compile_s": jax_case.get("compile_s") if jax_case else None,
           "jax_status": (_status(train, name, "bench_train.py") if name in CASES
                          else "PyTorch only"),
           "torch_status": _status(torch, name, "bench_torch.py")}
    cases.append(row)
  goals = []
  for goal in GOALS:
    value = goal.value(train, mmshap, torch)
    goals.append({"goal": goal.name, "value": value, "unit": goal.unit,
                  "threshold": goal.threshold, "comparison": "<=" if goal.at_most else ">=",
                  "status": goal.judge(value, small)})
  return {
      "small": small,
      "jax_environment": _environment(train),
      "torch_environment": (torch or {}).get("environment"),
      "nvidia_smi": nvidia_smi,
      "jax_device_count": jax_devices if train else None,
      "cases": cases,
      "mmshap": (mmshap or {}).get("results"),
      "mmshap_status": "measured" if mmshap else "not run (bench_mmshap.py wrote no JSON)",
      "goals": goals,
      "inputs": {"train": train, "mmshap": mmshap, "torch": torch},
  }


def _environment(results: dict | None) -> dict | None:
  return (results or {}).get("environment")


def _status(results: dict | None, name: str, script: str) -> str:
  """measured / skipped: why / error: what / not run."""
  if results is None:
    return f"not run ({script} wrote no JSON)"
  for case in results.get("cases", []):
    if case.get("name") == name:
      if case.get("examples_per_s"):
        return "measured"
      if case.get("skipped"):
        return f"skipped: {case['skipped']}"
      if case.get("error"):
        return f"error: {case['error']}"
  return "not run (case not selected)"


def _number(value: float | None, digits: int = 0) -> str:
  if value is None:
    return "-"
  return f"{value:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
  """The tables docs/BENCHMARKS.md shows: per-case JAX vs PyTorch, MM-SHAP, and the goals."""
  environment = report["jax_environment"] or {}
  lines = []
  if report["small"]:
    lines.append("**--small smoke run: tiny models, not performance numbers; goals are not judged.**\n")
  lines.append(f"JAX: {environment.get('device_kind', '?')} x{environment.get('device_count', '?')}, "
               f"jax {environment.get('jax_version', '?')}, flax {environment.get('flax_version', '?')}"
               f", {environment.get('compute_dtype', '?')} compute")
  torch_environment = report["torch_environment"] or {}
  if torch_environment:
    lines.append(f"PyTorch: {torch_environment.get('device_name', '?')}, torch "
                 f"{torch_environment.get('torch_version', '?')}, transformers "
                 f"{torch_environment.get('transformers_version', '?')}")
  if report["nvidia_smi"]:
    lines.append(f"nvidia-smi: {report['nvidia_smi'].strip()}")
  devices = report["jax_device_count"] or 1
  per_device = devices > 1
  if per_device:
    lines.append(f"JAX shards each batch over {devices} devices, PyTorch runs on one: the per-device "
                 "ratio divides JAX's rate by the device count.")
  lines += ["", "| case | JAX ex/s | PyTorch ex/s | JAX/PyTorch |"
            + (" per device |" if per_device else "") + " JAX TFLOP/s | JAX MFU | notes |",
            "|---|---:|---:|---:|" + ("---:|" if per_device else "") + "---:|---:|---|"]
  for case in report["cases"]:
    notes = [status for status in (case["jax_status"], case["torch_status"])
             if status not in ("measured", "PyTorch only")]
    mfu = f"{case['jax_mfu'] * 100:.1f}%" if case["jax_mfu"] is not None else "-"
    tflops = f"{case['jax_tflops_per_s']:.3g}" if case["jax_tflops_per_s"] is not None else "-"
    lines.append(f"| {case['name']} | {_number(case['jax_examples_per_s'])} | "
                 f"{_number(case['torch_examples_per_s'])} | {_number(case['jax_over_torch'], 2)} | "
                 + (f"{_number(case['jax_over_torch_per_device'], 2)} | " if per_device else "")
                 + f"{tflops} | {mfu} | {'; '.join(notes)} |")
  if report["mmshap"]:
    lines += ["", "| MM-SHAP p | coalitions | s/example | coalitions/s | JAX loop coalitions/s | "
              "speedup over loop |", "|---:|---:|---:|---:|---:|---:|"]
    for row in report["mmshap"]:
      lines.append(f"| {row['num_players']} | {row['coalitions_per_example']:,} | "
                   f"{row['engine_seconds_per_example']:.3f} | "
                   f"{_number(row['engine_coalitions_per_s'])} | "
                   f"{_number(row['baseline_coalitions_per_s'])} | {row['speedup']:.1f} |")
  else:
    lines.append(f"\nMM-SHAP: {report['mmshap_status']}")
  lines += ["", "| goal (issue #7) | measured | target | status |", "|---|---:|---:|---|"]
  for goal in report["goals"]:
    digits = 2 if goal["unit"] in ("x", "s") else 0
    lines.append(f"| {goal['goal']} | {_number(goal['value'], digits)} {goal['unit']} | "
                 f"{goal['comparison']} {goal['threshold']:,g} {goal['unit']} | {goal['status']} |")
  return "\n".join(lines)


def _load(path: str | None) -> dict | None:
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); rerun the script that writes it.") from e


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--train", help="bench_train.py's JSON")
  parser.add_argument("--mmshap", help="bench_mmshap.py's JSON")
  parser.add_argument("--torch", help="bench_torch.py's JSON")
  parser.add_argument("--nvidia_smi", help="a text file with nvidia-smi's GPU name and driver")
  parser.add_argument("--out", required=True, help="where to write the merged JSON")
  args = parser.parse_args(argv)
  nvidia_smi = None
  if args.nvidia_smi and os.path.isfile(args.nvidia_smi):
    with open(args.nvidia_smi) as f:
      nvidia_smi = f.read().strip() or None
  report = merge(_load(args.train), _load(args.mmshap), _load(args.torch), nvidia_smi)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(markdown(report))
  print(f"\nwrote {args.out}")
  return report


if __name__ == "__main__":
  main()
