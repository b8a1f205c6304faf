r"""Classifies and explains new products with a finished workdir (the trained ensemble).

  python predict.py --workdir=W --input=DIR --output=OUT        # DIR/products.csv + DIR/images/
  python predict.py --workdir=W --input=new.csv --image_dir=photos --output=OUT
  python predict.py --workdir=W --title="Acme desk lamp" --image=lamp.jpg --output=OUT
  python predict.py --workdir=W --input=DIR --output=OUT --no_explain   # no MM-SHAP: faster

Everything the models need comes from W (stage configs, tokenizers, class names, best
checkpoints, MM-SHAP settings, meta-models); no training flag is repeated. The CSV needs an id and a
title column and a photo per row (an image column, or `{image_dir}/{id}.jpg`); column names default
to those of the data W was trained on (`--id_column`, `--title_column`, `--image_column`,
`--label_column` change them). A label column is optional: with one, OUT/metrics.json scores every
method as the meta stage does. OUT gets predictions.csv, summary.json, bad_rows.json, and with
MM-SHAP mmshap.npz, explanations.html and explanations/*.png (jmmshap/predictor.py).

The products go through a chunk at a time (`--chunk_size`, rounded up to a multiple of the batch
sizes): each chunk's photos are read, every model run on it, and its rows appended to the output
files, so memory holds one chunk whatever the catalogue's size. The photos are checked (decoded)
once before any model runs, without keeping them.

Several processes (one per host) predict together with the launch flags of train.py
(docs/MULTIHOST.md, "Several hosts"): each reads its rows of every batch; process 0 writes the one output, in input order.
"""

from absl import app, flags

from jmmshap import errors, launch, parallel, predictor as predictor_lib, products

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir the main job finished in.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for predictions.csv and the explanations.")
_INPUT = flags.DEFINE_string("input", None, "A product CSV, or a folder holding one (its name and "
                             "image folder as in the training data: products.csv, images/).")
_IMAGE_DIR = flags.DEFINE_string("image_dir", None, "The photos' folder (default: images/ beside "
                                 "the CSV); image paths must lie inside it.")
_TITLE = flags.DEFINE_string("title", None, "One product's title (with --image), instead of --input.")
_IMAGE = flags.DEFINE_string("image", None, "One product's photo (with --title).")
_ID = flags.DEFINE_string("id", "product", "The one product's id (with --title).")
_LABEL = flags.DEFINE_string("label", None, "The one product's label, to score it (optional).")
_ID_COLUMN = flags.DEFINE_string("id_column", None, "Default: the training data's.")
_TITLE_COLUMN = flags.DEFINE_string("title_column", None, "Default: the training data's.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", None, "Default: the training data's; read "
                                    "only when the CSV has it. '': never.")
_IMAGE_COLUMN = flags.DEFINE_string("image_column", None, "Default: the training data's ('image' "
                                    "for toyshop). '': photos are {image_dir}/{id}.jpg.")
_ON_BAD_ROW = flags.DEFINE_enum("on_bad_row", "error", ["error", "skip"], "A bad row (missing or "
                                "corrupt photo, empty title, ...) stops with its line, or is "
                                "skipped and listed in bad_rows.json.")
_NO_EXPLAIN = flags.DEFINE_boolean("no_explain", False, "Skip MM-SHAP: no mmshap_sample, no "
                                   "explanations; the ensemble uses dataset weighting.")
_METHOD = flags.DEFINE_string("method", predictor_lib.AUTO, "The ensemble method of the "
                              "prediction column and the top classes (auto: the best by "
                              "validation macro F1, as the meta stage chose it in "
                              "W/meta/selection.json; summary.json says which and why).")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Top classes per product.")
_MAX_CARDS = flags.DEFINE_integer("max_cards", 200, "Products with an explanation card and PNG "
                                  "(the first ones; 0: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Products per forward call (0: each stage's "
                                   "eval_batch_size).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", predictor_lib.DEFAULT_CHUNK_SIZE, "Products "
                                   "per chunk (photos, arrays and MM-SHAP in memory at once); "
                                   "rounded up to a multiple of the batch sizes.")
_META_DIR = flags.DEFINE_string("meta_dir", "meta", "The main job's folder in the workdir (its "
                                "--config.output_dir).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_INPUT.value is None) == (_TITLE.value is None and _IMAGE.value is None):
    raise app.UsageError("give --input=CSV_OR_FOLDER, or one product as --title=... --image=...")
  if _INPUT.value is None and (_TITLE.value is None or _IMAGE.value is None):
    raise app.UsageError("one product needs both --title and --image.")
  launch.start()
  try:
    predictor = predictor_lib.Predictor.load(_WORKDIR.value, output_dir=_META_DIR.value,
                                             batch_size=_BATCH_SIZE.value)
    if _INPUT.value is None:
      source = products.single(_TITLE.value, _IMAGE.value, predictor.class_names,
                               product_id=_ID.value, label=_LABEL.value)
    else:
      columns = predictor_lib.input_columns(
          predictor.columns, id=_ID_COLUMN.value, title=_TITLE_COLUMN.value,
          label=_LABEL_COLUMN.value, image=_IMAGE_COLUMN.value)
      source = predictor.read(_INPUT.value, columns=columns, image_dir=_IMAGE_DIR.value,
                              on_bad_row=_ON_BAD_ROW.value, keep_photos=False)
    predictor_lib.predict_to_folder(predictor, source, _OUTPUT.value, explain=not _NO_EXPLAIN.value,
                                    method=_METHOD.value, top_k=_TOP_K.value,
                                    max_cards=_MAX_CARDS.value, chunk_size=_CHUNK_SIZE.value)
  finally:
    parallel.release_devices()


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
