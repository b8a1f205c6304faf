r"""Multimodal collapse on toyshop: does MM-SHAP weighting help when the MMBT ignores the photo?

  PYTHONPATH=. python scripts/collapse_benchmark.py --out=docs/results/collapse

The collapse is toyshop's shortcut (`data.toyshop.shortcut_strength`, jmmshap/toyshop.py): train
titles of the image-decided classes end with a product-line word that names the class with that
probability, and validation and test titles with a random one. Trained jointly, the MMBT fits
train from the one word and leaves its image pathway unlearnt, so on test it follows a random word
on exactly the classes only the photo decides. The photo learner never reads titles, so it is
untouched; the title learner learns the word too.

For every strength in `--strengths` and every seed of its list (`--seeds` at `--collapse_strength`,
`--sweep_seeds` elsewhere), the main job (configs/meta.py, toyshop) runs in RUNS/strength<s>, with
the MMBT and the meta-MLPs seeded by the seed (`stages.mmbt.seed`, `seed`; the text and image
learners are trained once per strength and reused, also by the next invocation) and every weighting, `complement` included.
Each run's record: every method's test macro F1 overall and per reliance group (the mean F1 of the
group's classes), and the MMBT's V-SHAP and accuracy per group.

Writes OUT/collapse.json: the settings and command, the wall time, every run's record, and per
strength each method's mean ± std (sample std) over seeds with the paired difference to `stacked`
(mean, std, Student's t-test over seeds and the exact sign-flip test); OUT/collapse.md, the table;
OUT/collapse_sweep.png, macro F1 of each method and the MMBT's V-SHAP on the image-decided classes
against the strength. The defaults (5 strengths, 5 seeds at full strength and 2 elsewhere, 13 main
jobs) took 18.6 minutes from scratch on this project's 2-core CPU (docs/RESULTS.md, "Multimodal
collapse"); the learners of a strength are reused by the next invocation.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from absl import app, flags, logging
from scipy import stats

from configs import meta as meta_configs
from jmmshap import ensemble, errors, learner_outputs, metrics, pipeline, toyshop, workdir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

GROUPS = ("text", "image", "both")
LEARNER_ROWS = ("text", "image", "mmbt", "average")  # Left out of the meta-models' panel.
BASELINE = "stacked"
WEIGHTINGS = "none,dataset,sample,complement"
JSON_NAME, TABLE_NAME, PLOT_NAME = "collapse.json", "collapse.md", "collapse_sweep.png"
# With line words in the titles the toyshop text learner's default 8 epochs stopped at 0.44-0.48
# validation accuracy; 20 epochs reached 0.567 (its ceiling is 0.58): the benchmark trains it longer.
DEFAULT_OVERRIDES = {"stages.text.num_epochs": 20}


def _define_flags() -> None:
  """Only when run as a script: tests import the functions beside other scripts' flags."""
  flags.DEFINE_string("out", None, "Where collapse.{json,md} and collapse_sweep.png go.")
  flags.DEFINE_string("runs", "/tmp/jmmshap_collapse", "Scratch workdirs, one per strength.")
  flags.DEFINE_string("data_dir", None, "Prepared-data cache (None: TFDS's default).")
  flags.DEFINE_list("strengths", ["0", "0.5", "0.8", "0.95", "1"], "Shortcut strengths.")
  flags.DEFINE_float("collapse_strength", 1.0, "The strength every method is compared at.")
  flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "MMBT and meta seeds at collapse_strength.")
  flags.DEFINE_list("sweep_seeds", ["0", "1"], "Seeds at the other strengths.")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE on configs/meta.py, e.g. "
                            "stages.mmbt.num_epochs=10 (a number, bool or string), on top of "
                            f"{DEFAULT_OVERRIDES}.")


# --------------------------------------------------------------------------------------------------
# One run.


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def run_config(strength: float, seed: int, *, data_dir: str | None,
               overrides: Mapping[str, Any] = ()):
  """The toyshop main job at `strength`, its MMBT and meta-MLPs seeded by `seed`; the MMBT and
  MM-SHAP are always run again (the workdir holds the previous seed's), the title and photo
  learners are reused while they fit the config."""
  config = meta_configs.get_config("toyshop")
  config.data.toyshop.shortcut_strength = float(strength)
  config.data.data_dir = data_dir
  config.stages.mmbt.seed = seed
  config.seed = seed
  config.meta.weighting = WEIGHTINGS
  config.rerun = "mmbt,mmshap"
  for key, value in dict(overrides).items():
    pipeline.set_field(config, key, value)
  return config


def group_f1(labels: np.ndarray, predictions: np.ndarray,
             reliance: Sequence[str]) -> dict[str, float]:
  """Macro F1 of each reliance group: the mean F1 of its classes in the whole C-class decision."""
  f1 = metrics.per_class(labels, predictions, len(reliance))["f1"]
  reliance = np.asarray(reliance)
  return {group: float(f1[reliance == group].mean()) for group in GROUPS if (reliance == group).any()}


def line_word_classes(spec: toyshop.ToyshopSpec, split: str) -> dict[str, str]:
  """Example id -> the image-decided class its title's line word names (image-decided examples
  only): where a collapsed model looks instead of the photo."""
  words = toyshop.line_words(spec)
  designs = [info.name for info in toyshop.classes(spec) if info.reliance == "image"]
  named = {}
  for example in toyshop.examples(spec, split):
    if example["label"] in designs:
      named[example["id"]] = designs[words.index(toyshop.title_line_word(example["title"]))]
  return named


def run_record(root: str, spec: toyshop.ToyshopSpec) -> dict[str, Any]:
  """What one finished main job in `root` scored: every method's test macro F1 (overall and per
  group); the MMBT's V-SHAP and accuracy per group (by true label); and on the image-decided
  products, how often the MMBT and the photo learner predict the class the line word names (chance:
  1 / the number of image-decided classes)."""
  predictions = np.load(workdir.path(root, ensemble.STAGE, workdir.PREDICTIONS_TEST))
  labels, class_names = predictions["labels"], [str(n) for n in predictions["class_names"]]
  by_name = {info.name: info.reliance for info in toyshop.classes(spec)}
  if set(class_names) != set(by_name):
    raise ValueError(f"{root}: its classes {class_names} are not toyshop's {sorted(by_name)}.")
  reliance = [by_name[name] for name in class_names]
  methods = {}
  for method, probabilities in zip(predictions["methods"], predictions["probabilities"]):
    predicted = probabilities.argmax(-1)
    methods[str(method)] = {
        "f1_macro": metrics.classification_metrics(labels, predicted, len(class_names))["f1_macro"],
        "groups": group_f1(labels, predicted, reliance)}
  outputs = learner_outputs.load_base_outputs(root, "test")
  shares = learner_outputs.load_shares(root, outputs)
  group_of_example = np.asarray(reliance)[outputs.labels]
  mmbt = {"v_shap": {}, "accuracy": {}}
  image = {"accuracy": {}}
  for group in GROUPS:
    rows = group_of_example == group
    defined = rows & shares.defined
    mmbt["v_shap"][group] = float(shares.v_shap[defined].mean()) if defined.any() else float("nan")
    for name, record in (("mmbt", mmbt), ("image", image)):
      record["accuracy"][group] = float(
          (outputs.logits[name][rows].argmax(-1) == outputs.labels[rows]).mean())
  if spec.shortcut_strength is not None:
    named = line_word_classes(spec, "test")
    rows = np.asarray([example_id in named for example_id in outputs.ids])
    word_class = np.asarray([class_names.index(named[i]) for i in outputs.ids[rows]])
    for name, record in (("mmbt", mmbt), ("image", image)):
      record["follows_line_word"] = float(
          (outputs.logits[name][rows].argmax(-1) == word_class).mean())
  return {"methods": methods, "mmbt": mmbt, "image_learner": image}


# --------------------------------------------------------------------------------------------------
# Over seeds.


def paired_test(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | None]:
  """The method minus the baseline, seed by seed: mean, std, Student's paired t-test and the exact
  sign-flip test (every one of the 2^n sign patterns of the differences; assumes only symmetry).
  p is None with fewer than 2 seeds; 1 when every difference is 0."""
  differences = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  count = len(differences)
  result = {"mean_difference": float(differences.mean()),
            "std_difference": float(differences.std(ddof=1)) if count > 1 else None,
            "t": None, "p_t_test": None, "p_sign_flip": None}
  if count < 2:
    return result
  if not differences.any():
    return {**result, "t": 0.0, "p_t_test": 1.0, "p_sign_flip": 1.0}
  if np.all(differences == differences[0]):  # No spread: the t statistic is unbounded.
    result.update(t=float("inf") * np.sign(differences[0]), p_t_test=0.0)
  else:
    test = stats.ttest_rel(values, baseline)
    result.update(t=float(test.statistic), p_t_test=float(test.pvalue))
  observed = abs(differences.sum())
  flips = np.asarray(list(itertools.product((1, -1), repeat=count)), np.float64)
  result["p_sign_flip"] = float((np.abs(flips @ differences) >= observed - 1e-12).mean())
  return result


def _spread(values: Sequence[float]) -> dict[str, Any]:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "values": values.tolist()}


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One strength's runs (one per seed, same methods): each method's macro F1 overall and per
  group as mean ± std, its paired test against `stacked`, and the MMBT's V-SHAP and accuracy."""
  methods = list(records[0]["methods"])
  for record in records[1:]:
    if list(record["methods"]) != methods:
      raise ValueError(f"the runs report different methods: {methods} and "
                       f"{list(record['methods'])}.")
  summary = {"seeds": [record["seed"] for record in records], "methods": {}, "vs_stacked": {}}
  for method in methods:
    f1 = [record["methods"][method]["f1_macro"] for record in records]
    summary["methods"][method] = {
        "f1_macro": _spread(f1),
        "groups": {group: _spread([r["methods"][method]["groups"][group] for r in records])
                   for group in records[0]["methods"][method]["groups"]}}
    if method != BASELINE and BASELINE in methods:
      baseline = [record["methods"][BASELINE]["f1_macro"] for record in records]
      summary["vs_stacked"][method] = paired_test(f1, baseline)
  summary["mmbt"] = {key: {group: _spread([r["mmbt"][key][group] for r in records])
                           for group in GROUPS} for key in ("v_shap", "accuracy")}
  summary["image_learner"] = {"accuracy": {group: _spread([r["image_learner"]["accuracy"][group]
                                                           for r in records]) for group in GROUPS}}
  for name in ("mmbt", "image_learner"):
    if all("follows_line_word" in r[name] for r in records):
      summary[name]["follows_line_word"] = _spread([r[name]["follows_line_word"] for r in records])
  return summary


# --------------------------------------------------------------------------------------------------
# Reports.


def _cell(spread: Mapping[str, Any]) -> str:
  return f"{spread['mean']:.4f} ± {spread['std']:.4f}"


def markdown(result: Mapping[str, Any]) -> str:
  """The table at the collapse strength, then the sweep's macro F1 and the MMBT's V-SHAP."""
  key = _key(result["collapse_strength"])
  at = result["strengths"][key]
  lines = [f"Shortcut strength {key}, seeds {', '.join(map(str, at['seeds']))}: test macro F1, "
           "mean ± std over seeds; the paired difference to stacked with Student's t-test p and "
           "the exact sign-flip p.", "",
           "| method | macro F1 | text-decided | image-decided | both | - stacked | p (t) | "
           "p (sign-flip) |", "| --- |" + " ---: |" * 7]
  for method, scores in at["methods"].items():
    test = at["vs_stacked"].get(method)
    groups = " | ".join(_cell(scores["groups"][g]) for g in GROUPS)
    paired = ("| | |" if test is None else
              f"{test['mean_difference']:+.4f} | {_p(test['p_t_test'])} | {_p(test['p_sign_flip'])} |")
    lines.append(f"| {method} | {_cell(scores['f1_macro'])} | {groups} | {paired}")
  lines += ["", "The MMBT on the test split, by reliance group (true label): mean V-SHAP and "
            "accuracy; on the image-decided products, how often it predicts the class the line "
            "word names (chance 1/4), against the image learner's accuracy; then every method's "
            "mean macro F1.", "",
            "| strength | seeds | MMBT V-SHAP text / image / both | MMBT accuracy text / image / both "
            "| MMBT follows the word | image learner accuracy, image-decided | " + " | ".join(
                f"{m}" for m in at["methods"]) + " |", "| ---: |" + " ---: |" * (5 + len(at["methods"]))]
  for strength, summary in result["strengths"].items():
    v_shap = " / ".join(f"{summary['mmbt']['v_shap'][g]['mean']:.3f}" for g in GROUPS)
    accuracy = " / ".join(f"{summary['mmbt']['accuracy'][g]['mean']:.3f}" for g in GROUPS)
    follows = summary["mmbt"].get("follows_line_word")
    f1 = " | ".join(f"{summary['methods'][m]['f1_macro']['mean']:.4f}" for m in summary["methods"])
    lines.append(f"| {strength} | {len(summary['seeds'])} | {v_shap} | {accuracy} | "
                 f"{'-' if follows is None else format(follows['mean'], '.3f')} | "
                 f"{summary['image_learner']['accuracy']['image']['mean']:.3f} | {f1} |")
  return "\n".join(lines) + "\n"


def _p(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}"


def plot(result: Mapping[str, Any], path: str) -> None:
  """Macro F1 per method (mean, std bars), the meta-models alone on a finer scale, and the MMBT's
  V-SHAP per group, image-decided accuracy and line-word following against strength."""
  strengths = list(result["strengths"])
  x = [float(s) for s in strengths]
  figure, (every, meta_only, mmbt) = plt.subplots(1, 3, figsize=(17, 4.8))
  methods = list(result["strengths"][strengths[0]]["methods"])
  for axes, shown in ((every, methods), (meta_only, [m for m in methods if m not in LEARNER_ROWS])):
    for method in shown:
      spreads = [result["strengths"][s]["methods"][method]["f1_macro"] for s in strengths]
      axes.errorbar(x, [v["mean"] for v in spreads], yerr=[v["std"] for v in spreads], marker="o",
                    capsize=3, label=method, color=f"C{methods.index(method)}")
    axes.set_xlabel("shortcut strength (collapse)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
  every.set_ylabel("test macro F1 (mean ± std over seeds)")
  meta_only.set_title("the meta-models only", fontsize=10)
  for group in GROUPS:
    means = [result["strengths"][s]["mmbt"]["v_shap"][group]["mean"] for s in strengths]
    mmbt.plot(x, means, marker="o", label=f"V-SHAP, {group}-decided")
  means = [result["strengths"][s]["mmbt"]["accuracy"]["image"]["mean"] for s in strengths]
  mmbt.plot(x, means, marker="s", linestyle="--", label="accuracy, image-decided")
  if all("follows_line_word" in result["strengths"][s]["mmbt"] for s in strengths):
    means = [result["strengths"][s]["mmbt"]["follows_line_word"]["mean"] for s in strengths]
    mmbt.plot(x, means, marker="^", linestyle=":", label="follows the line word, image-decided")
  mmbt.set_xlabel("shortcut strength (collapse)")
  mmbt.set_ylabel("the MMBT on test (mean over seeds)")
  mmbt.set_ylim(0, 1.05)
  mmbt.legend(fontsize=8)
  mmbt.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write(result: Mapping[str, Any], out: str) -> None:
  os.makedirs(out, exist_ok=True)
  workdir.write_text(os.path.join(out, JSON_NAME), json.dumps(result, indent=2) + "\n")
  workdir.write_text(os.path.join(out, TABLE_NAME), markdown(result))
  plot(result, os.path.join(out, PLOT_NAME))


def _key(strength: float) -> str:
  return f"{float(strength):g}"


# --------------------------------------------------------------------------------------------------


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  started = time.perf_counter()
  flag = flags.FLAGS
  overrides = dict(item.split("=", 1) for item in flag.override)
  overrides = {**DEFAULT_OVERRIDES, **{key: _parse_value(value) for key, value in overrides.items()}}
  collapse = _key(flag.collapse_strength)
  runs: list[dict[str, Any]] = []
  summaries = {}
  for strength in sorted({_key(s) for s in flag.strengths} | {collapse}, key=float):
    seeds = [int(s) for s in (flag.seeds if strength == collapse else flag.sweep_seeds)]
    root = os.path.join(flag.runs, f"strength{strength}")
    records = []
    for seed in seeds:
      run_started = time.perf_counter()
      config = run_config(float(strength), seed, data_dir=flag.data_dir, overrides=overrides)
      pipeline.run(config, root)
      spec = toyshop.ToyshopSpec(**config.data.toyshop.to_dict())
      record = {"strength": float(strength), "seed": seed, **run_record(root, spec),
                "wall_s": time.perf_counter() - run_started}
      records.append(record)
      runs.append(record)
      print(f"strength {strength} seed {seed}: " + ", ".join(
          f"{m} {v['f1_macro']:.4f}" for m, v in record["methods"].items())
            + f"; MMBT V-SHAP image {record['mmbt']['v_shap']['image']:.3f} "
            f"({record['wall_s']:.0f} s)", flush=True)
    summaries[strength] = summarise(records)
  result = {"command": " ".join(["python"] + sys.argv), "collapse_strength": float(collapse),
            "weightings": WEIGHTINGS, "overrides": overrides,
            "wall_s": time.perf_counter() - started, "strengths": summaries, "runs": runs}
  write(result, flag.out)
  print(markdown(result))
  print(f"wall time {result['wall_s'] / 60:.1f} min; wrote {flag.out}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(errors.exit_on_user_error(main))
