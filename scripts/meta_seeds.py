r"""The meta stage over several seeds on one set of finished base learners: mean, spread, per method.

  python scripts/meta_seeds.py --config=configs/meta.py:fashion --workdir=W --seeds=0,1,2 \
      --config.data.data_dir=DIR

The upstream stages (text, image, clip_pretrain, mmbt, mmshap) must be finished in W (run
`train.py --config=configs/meta.py...` once); each seed retrains only the meta-models, into
W/meta_seed{seed}/, whose seed sets their initialisation, folds and holdout. Writes
W/meta_seeds.json ({method: {metric: {mean, std, min, max, values}}}) and W/meta_seeds.md.
The base learners are deterministic given their checkpoints, so their spread is zero here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jmmshap import errors, pipeline, workdir

TABLE_METRICS = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")


def aggregate(reports: Sequence[dict]) -> dict[str, dict[str, dict]]:
  """{method: {metric: {mean, std, min, max, values}}} over the seeds' `metrics.json` reports."""
  methods = reports[0]["methods"]
  for report in reports[1:]:
    if report["methods"].keys() != methods.keys():
      raise ValueError(f"the seeds' reports list different methods: {sorted(methods)} and "
                       f"{sorted(report['methods'])}; run every seed with the same weightings.")
  summary = {}
  for method, first in methods.items():
    summary[method] = {}
    for metric in first:
      values = np.asarray([report["methods"][method][metric] for report in reports], np.float64)
      summary[method][metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=0)),
                                 "min": float(values.min()), "max": float(values.max()),
                                 "values": values.tolist()}
  return summary


def markdown(summary: dict[str, dict[str, dict]], seeds: Sequence[int]) -> str:
  header = "| method | " + " | ".join(TABLE_METRICS) + " |"
  lines = [f"Test metrics over meta seeds {', '.join(map(str, seeds))}: mean ± std (min-max).", "",
           header, "| --- |" + " ---: |" * len(TABLE_METRICS)]
  for method, values in summary.items():
    cells = [f"{values[m]['mean']:.4f} ± {values[m]['std']:.4f} ({values[m]['min']:.4f}-"
             f"{values[m]['max']:.4f})" for m in TABLE_METRICS]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  seeds = [int(seed) for seed in flags.FLAGS.seeds]
  root = flags.FLAGS.workdir
  reports = []
  for seed in seeds:
    config = flags.FLAGS.config.copy_and_resolve_references()
    config.seed = seed
    config.output_dir = f"meta_seed{seed}"
    missing = [stage for stage in pipeline.UPSTREAM if stage in config.stages
               and workdir.missing(root, stage, pipeline.REGISTRY[stage].writes)]
    if missing:
      raise errors.UserError(
          f"{root}: stages {', '.join(missing)} are not finished; run `python train.py "
          f"--config=configs/meta.py:{config.variant} --workdir={root}` first (this script "
          "retrains only the meta-models).")
    pipeline.run(config, root)
    reports.append(workdir.read_json(os.path.join(root, config.output_dir, workdir.METRICS)))
  summary = aggregate(reports)
  with open(os.path.join(root, "meta_seeds.json"), "w") as f:
    json.dump({"seeds": seeds, "methods": summary}, f, indent=2)
  table = markdown(summary, seeds)
  with open(os.path.join(root, "meta_seeds.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  # Flags only when run as a script, so tests can import the functions beside other scripts.
  config_flags.DEFINE_config_file("config", None, "configs/meta.py[:variant].", lock_config=False)
  flags.DEFINE_string("workdir", None, "A workdir whose upstream stages are finished.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Meta-model seeds.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(errors.exit_on_user_error(main))
