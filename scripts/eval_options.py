r"""The exact effect of the evaluation-only options of a finished classifier stage.

  PYTHONPATH=. python scripts/eval_options.py --workdir=W --stage=image --out=effects.json

`ema_decay` and `eval_flip_average` do not change training: the EMA is a moving average kept next
to the trained params, and flip averaging happens only when logits are computed. So one finished
run measures both exactly: its latest train state (`checkpoints/<last step>`) is evaluated with the
trained params and with their moving average, each with and without averaging over the mirrored
photo, on validation and test. Writes {params: {flip: {split: metrics}}} as JSON; prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys

from flax import nnx

from jmmshap import (builders, checkpoints, classifier, errors, parallel, train_lib,
                     workdir)
from jmmshap.tokenizer import TitleTokenizer


def evaluate_options(root: str, stage_name: str = "image") -> dict[str, dict[str, dict]]:
  """{"trained"|"ema": {"flip"|"no_flip": {split: loss and classification metrics}}} of the
  stage's last train state; "ema" only where the run kept one, "flip" only for a stage that reads
  photos."""
  stage = classifier.CLASSIFIERS[stage_name]
  directory = workdir.stage_dir(root, stage.name)
  config = classifier.effective_config(
      workdir.resolve_paths(workdir.read_config(root, stage.name), root))
  builder = builders.builder_for(config.data)
  sources = {split: builders.data_source(builder, split) for split in builders.SPLITS}
  class_names = workdir.read_json(os.path.join(directory, workdir.CLASS_NAMES))
  tokenizer = (TitleTokenizer.from_folder(directory, max_length=config.data.max_length)
               if stage.uses_text else None)
  model = stage.build_model(config, len(class_names), tokenizer)
  model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
  total_steps = train_lib.step_plan(config, len(sources["train"]))[0]
  optimizer, _ = train_lib.make_optimizer(config.optimizer, total_steps)
  mesh = parallel.make_mesh()
  store = checkpoints.StageCheckpoints(directory)
  try:
    step = store.latest_step()
    if step != total_steps:
      raise ValueError(f"{directory}: its latest train state is step {step} of {total_steps}; "
                       "finish the run first (train.py with the same config resumes it).")
    state = store.restore_latest(step, checkpoints.abstract(
        train_lib.initial_state(config, params, model_state, optimizer), parallel.replicated(mesh)))
  finally:
    store.close()
  variants = {"trained": {"params": state["params"], "model_state": state.get("model_state")}}
  if "ema" in state:
    variants["ema"] = train_lib.evaluated_model(state)
  flips = {"no_flip": False, "flip": True} if stage.uses_image else {"no_flip": False}
  preprocess = classifier.make_preprocessor(config, stage, tokenizer)
  batch_size = config.get("eval_batch_size") or config.batch_size
  results: dict[str, dict[str, dict]] = {}
  for flip_name, flip in flips.items():
    eval_step = classifier.jit_eval_step(graphdef, stage.inputs, mesh, flip,
                                         preprocess.photo_transform())
    for variant, model_tree in variants.items():
      for split in builders.EVAL_SPLITS:
        result = classifier.evaluate(eval_step, model_tree["params"], model_tree["model_state"],
                                     sources[split], preprocess, batch_size, mesh)
        results.setdefault(variant, {}).setdefault(flip_name, {})[split] = (
            classifier.validation_scores(result, len(class_names)))
  return results


def table(results: dict[str, dict[str, dict]]) -> str:
  lines = ["| params | flip averaging | validation F1 macro | test F1 macro | test accuracy |",
           "| --- | --- | ---: | ---: | ---: |"]
  for variant, by_flip in results.items():
    for flip_name, by_split in by_flip.items():
      lines.append(f"| {variant} | {'yes' if flip_name == 'flip' else 'no'} | "
                   f"{by_split['validation']['f1_macro']:.4f} | {by_split['test']['f1_macro']:.4f} | "
                   f"{by_split['test']['accuracy']:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--stage", default="image", choices=sorted(classifier.CLASSIFIERS))
  parser.add_argument("--out", help="JSON file to write (default: print the table only)")
  args = parser.parse_args(argv)
  results = evaluate_options(args.workdir, args.stage)
  if args.out:
    workdir.write_json(args.out, results)
  print(table(results), end="")


if __name__ == "__main__":
  errors.exit_on_user_error(main)(sys.argv[1:])
