r"""New toyshop products to classify: a product folder for predict.py.

  PYTHONPATH=. python scripts/toyshop_products.py --workdir=W --output=DIR
  python predict.py --workdir=W --input=DIR --output=OUT

Writes DIR/products.csv (id, title, image[, label]) and DIR/images/{id}.png: `--count` products of
the classes W was trained on (the toyshop spec in W/mmbt/config.json), drawn with another seed
(`--seed`; ids `seed<N>-test-...`), so none of them is in W's data. `--labels` adds the label
column (predict.py then scores itself); `--seed=-1 --count=0` writes W's own test split instead.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from jmmshap import classifier, errors, toyshop, workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "A toyshop workdir (its MMBT's spec is used); "
                               "none: the default toyshop spec.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write.")
_SEED = flags.DEFINE_integer("seed", 7, "Generator seed (the training data's is 0); -1: the "
                             "workdir's own.")
_SPLIT = flags.DEFINE_enum("split", "test", list(toyshop.SPLITS), "Which split's recipe to draw.")
_COUNT = flags.DEFINE_integer("count", 24, "Products to write (0: the whole split).")
_LABELS = flags.DEFINE_boolean("labels", False, "Write the label column too.")
flags.mark_flags_as_required(["output"])


def main(argv):
  del argv
  data = (workdir.read_config(_WORKDIR.value, classifier.MMBT.name).data if _WORKDIR.value
          else None)
  if data is not None and data.name != "toyshop":
    raise app.UsageError(f"{_WORKDIR.value} was trained on {data.name!r} data, not toyshop.")
  spec = toyshop.ToyshopSpec(**(data.toyshop.to_dict() if data is not None else {}))
  prefix = ""
  if _SEED.value >= 0 and _SEED.value != spec.seed:  # New products: ids of their own.
    spec, prefix = dataclasses.replace(spec, seed=_SEED.value), f"seed{_SEED.value}-"
  path = toyshop.write_products(_OUTPUT.value, spec, _SPLIT.value, labels=_LABELS.value,
                                limit=_COUNT.value, id_prefix=prefix)
  print(f"wrote {path} and its images (seed {spec.seed}, split {_SPLIT.value})")


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
