"""The predictor: a finished tiny toyshop workdir classifies and explains new products, and the test
split given as new products gets exactly what the meta stage reported for it."""

import csv
import dataclasses
import io
import json
import os
import shutil
import sys
import threading

import jax
import numpy as np
import pytest
import train_subprocess
from PIL import Image

from jmmshap import (builders, catalog, classifier, ensemble, explanations, input_pipeline,
                     pipeline, predictor, products, stream_files, toyshop, workdir)

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def job(tiny_main_job):
  """The session's tiny toyshop main job: (workdir, its config)."""
  return tiny_main_job


@pytest.fixture(scope="module")
def loaded(job):
  return predictor.Predictor.load(job[0])


def _spec(config, **changes):
  return dataclasses.replace(toyshop.ToyshopSpec(**config.data.toyshop.to_dict()), **changes)


def _write_split(folder, config, split="test", labels=False):
  """A split of the workdir's prepared data, in its order, as new products: products.csv (id, title,
  image[, label]) and lossless PNGs of the photos the stages read."""
  builder = builders.prepare(config.stages.mmbt.data)
  source = builder.as_data_source(split)
  names = builder.info.features["label"].names
  os.makedirs(os.path.join(folder, "images"))
  rows = []
  for index in range(len(source)):
    record = source[index]
    product_id = record["id"].decode()
    Image.fromarray(record["image"]).save(os.path.join(folder, "images", f"{product_id}.png"))
    rows.append([product_id, record["title"].decode(), f"{product_id}.png"]
                + ([names[record["label"]]] if labels else []))
  _write_csv(folder, ["id", "title", "image"] + (["label"] if labels else []), rows)
  return folder


@pytest.fixture(scope="module")
def test_split(job, tmp_path_factory):
  """The workdir's own test split written out as new products, without labels."""
  return _write_split(str(tmp_path_factory.mktemp("test_split")), job[1])


@pytest.fixture(scope="module")
def test_split_predictions(loaded, test_split):
  return loaded.predict(test_split)


def _selection(root):
  with open(workdir.path(root, "meta", workdir.SELECTION)) as f:
    return json.load(f)


def _reported(root):
  with np.load(workdir.path(root, "meta", workdir.PREDICTIONS_TEST)) as data:
    return {key: data[key] for key in data.files}


def test_the_test_split_as_new_products_gets_what_the_meta_stage_reported(job, test_split_predictions):
  reported = _reported(job[0])
  ours = test_split_predictions
  np.testing.assert_array_equal(ours.ids, reported["ids"])
  assert ours.products.labels is None  # Predicted without labels.
  assert list(ours.probabilities) == list(reported["methods"])  # Every learner and weighting.
  for method, probabilities in zip(reported["methods"], reported["probabilities"]):
    np.testing.assert_allclose(ours.probabilities[method], probabilities, atol=TOLERANCE,
                               err_msg=method)
    np.testing.assert_array_equal(ours.classes(method),
                                  reported["class_names"][probabilities.argmax(-1)], err_msg=method)
  # The products' own MM-SHAP (behind mmshap_sample) is what the mmshap stage computed for them.
  with np.load(workdir.path(job[0], "mmshap", workdir.shares_file("test"))) as stage:
    np.testing.assert_array_equal(ours.shapley["ids"], stage["ids"])
    np.testing.assert_allclose(ours.shapley["t_shap"], stage["t_shap"], atol=TOLERANCE)
    np.testing.assert_allclose(ours.shapley["phi"], stage["phi"], atol=TOLERANCE)
  assert ours.method == _selection(job[0])["chosen"]  # Explained: every method is there.


def test_labelled_input_through_the_command_reproduces_the_stages_test_metrics(job, loaded,
                                                                                tmp_path):
  folder, output = _write_split(str(tmp_path / "labelled"), job[1], labels=True), str(tmp_path / "out")
  source = loaded.read(folder, on_bad_row="skip")
  predictor.predict_to_folder(loaded, source, output, top_k=2, max_cards=3)
  with open(os.path.join(output, workdir.METRICS)) as f:
    ours = json.load(f)
  with open(workdir.path(job[0], "meta", workdir.METRICS)) as f:
    stage = json.load(f)
  assert list(ours["methods"]) == list(stage["methods"])
  for method, scores in stage["methods"].items():
    assert ours["methods"][method] == pytest.approx(scores, abs=1e-12), method
  with open(os.path.join(output, workdir.PREDICTIONS)) as f:
    rows = list(csv.DictReader(f))
  reported = _reported(job[0])
  assert [row["id"] for row in rows] == reported["ids"].tolist()
  stacked = reported["probabilities"][list(reported["methods"]).index("stacked")]
  for row, probabilities in zip(rows, stacked):
    assert row["stacked_class"] == reported["class_names"][probabilities.argmax()]
    assert float(row["stacked_probability"]) == pytest.approx(probabilities.max(), abs=TOLERANCE)
    assert row["label"] and row["prediction"] == row["top1_class"]
  with open(os.path.join(output, workdir.BAD_ROWS)) as f:
    assert json.load(f)["skipped"] == 0
  assert len(os.listdir(os.path.join(output, workdir.EXPLANATION_PNGS))) == 3  # --max_cards.


@pytest.fixture(scope="module")
def new_products(job, tmp_path_factory):
  """Products the workdir never saw (another generator seed), without labels."""
  folder = str(tmp_path_factory.mktemp("new"))
  toyshop.write_products(folder, _spec(job[1], seed=5, test_per_class=1), "test",
                         id_prefix="new-")
  return folder


def test_new_products_keep_their_ids_and_order_whatever_the_input_order(loaded, new_products):
  read = loaded.read(new_products)
  first = loaded.predict(read)
  reverse = products.subset(read, range(len(read) - 1, -1, -1))
  second = loaded.predict(reverse)
  np.testing.assert_array_equal(second.ids, first.ids[::-1])
  for method in first.probabilities:
    np.testing.assert_allclose(second.probabilities[method], first.probabilities[method][::-1],
                               atol=1e-5, err_msg=method)
  np.testing.assert_allclose(second.shapley["t_shap"], first.shapley["t_shap"][::-1], atol=1e-5)
  frame = first.frame(top_k=2)
  assert list(frame["id"]) == first.ids.tolist()
  assert list(frame.columns) == first.table(top_k=2)[0]
  np.testing.assert_allclose(frame["mmshap_sample_probability"],
                             first.probabilities["mmshap_sample"].max(-1))
  np.testing.assert_allclose(loaded.predict_proba(reverse),
                             second.probabilities[loaded.selection["chosen"]])


def test_one_product_handed_over_in_memory_is_classified_as_in_a_batch(loaded, new_products):
  batch = loaded.predict(new_products, explain=False)
  row = 3
  with Image.open(os.path.join(new_products, "images", f"{batch.ids[row]}.png")) as photo:
    single = products.single(batch.products.titles[row], photo.copy(), loaded.class_names,
                             product_id=batch.ids[row])
  alone = loaded.predict(single, explain=False)
  assert alone.ids.tolist() == [batch.ids[row]]
  for method in batch.probabilities:
    np.testing.assert_allclose(alone.probabilities[method][0], batch.probabilities[method][row],
                               atol=1e-5, err_msg=method)


def test_without_explanations_dataset_weighting_is_unchanged_and_sample_weighting_absent(
    loaded, test_split, test_split_predictions, tmp_path):
  quick = loaded.predict(test_split, explain=False)
  assert "mmshap_sample" not in quick.probabilities and quick.shapley is None
  assert quick.method == next(m for m in loaded.selection["ranking"] if m != "mmshap_sample")
  for method in quick.probabilities:
    np.testing.assert_allclose(quick.probabilities[method],
                               test_split_predictions.probabilities[method], atol=TOLERANCE)
  loaded.write(quick, str(tmp_path))
  with open(tmp_path / workdir.PREDICTIONS) as f:
    rows = list(csv.DictReader(f))
  assert rows[0]["t_shap"] == "" and "mmshap_sample_class" not in rows[0]
  assert not (tmp_path / workdir.EXPLANATIONS_HTML).exists()


def test_auto_is_the_method_with_the_best_out_of_fold_score_and_summary_json_says_so(
    job, loaded, test_split_predictions):
  """The tiny main job cross-fits its meta-models (the config's default), so its selection ranks
  every method by validation macro F1, the meta-models' out of fold (training.json)."""
  selection = _selection(job[0])
  assert loaded.selection == selection and selection["rule"] == ensemble.BEST_RULE
  with open(workdir.path(job[0], "meta", workdir.TRAINING)) as f:
    training = json.load(f)
  scores = selection["scores"]
  for method in ("stacked", "mmshap_dataset", "mmshap_sample"):
    assert selection["scored_on"][method] == "out-of-fold"
    assert scores[method] == training[method]["held_out_validation"]["f1_macro"]
  best = max(scores.values())
  assert selection["chosen"] == next(m for m in ensemble.PREFERENCE if scores[m] == best)
  ours = test_split_predictions
  summary = loaded.summary(ours.products, len(ours.products), ours.method,
                           list(ours.probabilities), True, ours.timings)
  assert summary["method"] == selection["chosen"]
  assert summary["method_selection"] == {
      "auto": selection["chosen"], "chosen_in_workdir": selection["chosen"], "passed_over": None,
      **{key: selection[key] for key in ("rule", "metric", "scores", "scored_on", "ranking")}}


def _designed_selection(**scores):
  """A selection over the tiny main job's methods by the given scores (the rest 0.1)."""
  methods = ensemble.method_names(["none", "dataset", "sample"])
  return ensemble.select_method(methods, {**dict.fromkeys(methods, 0.1), **scores},
                                dict.fromkeys(methods, "out-of-fold"), "")


def test_auto_follows_the_workdirs_choice_and_its_ranking_where_the_choice_is_missing(
    loaded, new_products, tmp_path, monkeypatch):
  """Designed selections: stacked best (not mmshap_sample, though the explained products have it);
  then mmshap_sample best and the mmbt next, so unexplained products get the mmbt, which no fixed
  preference would give."""
  monkeypatch.setattr(loaded, "selection", _designed_selection(stacked=0.9, mmshap_sample=0.8))
  explained = loaded.predict(new_products)
  assert "mmshap_sample" in explained.probabilities and explained.method == "stacked"
  monkeypatch.setattr(loaded, "selection", _designed_selection(mmshap_sample=0.9, mmbt=0.8))
  quick = loaded.predict(new_products, explain=False)
  assert quick.method == "mmbt"
  np.testing.assert_array_equal(quick.classes(), explained.classes("mmbt"))
  summary = loaded.write(quick, str(tmp_path))
  with open(tmp_path / workdir.SUMMARY) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["method"] == "mmbt"
  choice = summary["method_selection"]
  assert (choice["auto"], choice["chosen_in_workdir"]) == ("mmbt", "mmshap_sample")
  assert choice["passed_over"] == ("mmshap_sample is not among these predictions' methods (it "
                                   "needs the products' MM-SHAP): mmbt, next in the ranking")


def test_a_workdir_without_a_selection_keeps_the_fixed_preference(job, tmp_path):
  """A main job run before the selection existed: mmshap_sample when explained, else
  mmshap_dataset, as predict chose then; summary.json says why."""
  older = _farm(job[0], tmp_path / "older", replace=("meta",))
  os.remove(workdir.path(older, "meta", workdir.SELECTION))
  loaded = predictor.Predictor.load(older)
  assert loaded.selection["chosen"] == "mmshap_sample"
  unexplained = [m for m in loaded.selection["ranking"] if m != "mmshap_sample"]
  choice = loaded.method_selection(unexplained)
  assert choice["auto"] == "mmshap_dataset" and choice["scores"] == {}
  assert choice["rule"].startswith("fixed preference mmshap_sample, mmshap_dataset, stacked")
  assert "selection.json not found" in choice["rule"]


def _write_csv(folder, header, rows):
  with open(os.path.join(folder, "products.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_bad_rows_stop_with_their_line_or_are_skipped_listed_and_never_misalign(
    loaded, new_products, tmp_path):
  good = loaded.predict(new_products, explain=False)
  folder = tmp_path / "bad"
  shutil.copytree(new_products, folder)
  with open(folder / "images" / "corrupt.png", "wb") as f:
    f.write(b"\x89PNG not really")
  titles, ids = good.products.titles, good.ids
  rows = [[ids[0], titles[0], f"{ids[0]}.png"],
          ["missing", titles[1], "missing.png"],  # line 3
          [ids[2], titles[2], f"{ids[2]}.png"],
          ["corrupt", titles[3], "corrupt.png"],  # line 5
          ["untitled", "  ", f"{ids[4]}.png"],  # line 6
          ["outside", titles[5], "../../etc/passwd"],  # line 7
          [ids[6], titles[6], f"{ids[6]}.png"]]
  _write_csv(str(folder), ["id", "title", "image"], rows)
  with pytest.raises(catalog.BadRowError, match=r"line 3 \(id 'missing'\): missing image file: "
                                                r".*missing\.png \(4 bad rows in all\)"):
    loaded.read(str(folder))
  read = loaded.read(str(folder), on_bad_row="skip")
  report = read.report()
  assert (report["products"], report["skipped"]) == (3, 4)
  reasons = {bad["line"]: (bad["id"], bad["reason"]) for bad in report["bad_rows"]}
  assert reasons[3] == ("missing", "missing image file")
  assert reasons[5][0] == "corrupt" and reasons[5][1].startswith("corrupt image")
  assert reasons[6] == ("untitled", "empty title in column 'title'")
  assert reasons[7][0] == "outside" and "leads outside the image folder" in reasons[7][1]
  skipped = loaded.predict(read, explain=False)
  assert skipped.ids.tolist() == [ids[0], ids[2], ids[6]]
  for method in good.probabilities:
    np.testing.assert_allclose(skipped.probabilities[method], good.probabilities[method][[0, 2, 6]],
                               atol=1e-5, err_msg=method)
  output = tmp_path / "out"
  with pytest.raises(ValueError, match="no products to classify: all 1 rows"):
    predictor.predict_to_folder(loaded, loaded.read(
        [{"id": "x", "title": "a lamp", "image": str(folder / "images" / "corrupt.png")}],
        on_bad_row="skip"), str(output))
  with open(output / workdir.BAD_ROWS) as f:
    assert json.load(f)["bad_rows"][0]["reason"].startswith("corrupt image")
  with pytest.raises(catalog.CsvFormatError, match=r"no column\(s\) 'sku'; the header has 'id', "
                                                   r"'title', 'image'"):
    loaded.read(str(folder), columns=predictor.input_columns(loaded.columns, id="sku"))
  with pytest.raises(catalog.BadRowError, match=r"row 2 \(id 'a'\): duplicate id 'a' \(first on "
                                                r"row 1\)"):
    loaded.read([{"id": "a", "title": "x", "image": np.zeros((4, 4, 3), np.uint8)}] * 2)
  with pytest.raises(catalog.BadRowError, match=r"label 'sofa' is not one of the 12 classes"):
    loaded.read([{"id": "a", "title": "x", "image": np.zeros((4, 4, 3), np.uint8),
                  "label": "sofa"}])


def _farm(root, target, replace=()):
  """A workdir made of links to `root`'s stage folders, with the folders in `replace` copied."""
  os.makedirs(target)
  for name in os.listdir(root):
    if name in replace:
      shutil.copytree(os.path.join(root, name), os.path.join(target, name))
    else:
      os.symlink(os.path.join(root, name), os.path.join(target, name))
  return str(target)


def test_an_unfinished_or_stale_workdir_is_refused_with_what_to_run(job, tmp_path):
  root = job[0]
  with pytest.raises(predictor.WorkdirNotReady, match=r"holds no finished main job"):
    predictor.Predictor.load(str(tmp_path / "empty"))
  unfinished = _farm(root, tmp_path / "unfinished", replace=("mmshap",))
  os.remove(workdir.path(unfinished, "mmshap", workdir.shares_file("test")))
  with pytest.raises(predictor.WorkdirNotReady, match=r"is not finished: .*mmshap_test\.npz "
                                                       r"missing; run the main job again.*"
                                                       r"python train\.py --config=configs/meta\.py:"
                                                       r"toyshop --workdir="):
    predictor.Predictor.load(unfinished)
  replaced = _farm(root, tmp_path / "replaced", replace=("mmshap",))
  fingerprint = workdir.read_fingerprint(replaced, "mmshap")
  fingerprint["reads"]["mmbt"] = "an older run"
  workdir.write_json(workdir.path(replaced, "mmshap", workdir.FINGERPRINT), fingerprint)
  with pytest.raises(predictor.WorkdirNotReady, match=r"out of date: mmshap was built from a mmbt "
                                                       r"run that was replaced since"):
    predictor.Predictor.load(replaced)
  changed = _farm(root, tmp_path / "changed", replace=("mmshap",))
  path = workdir.path(changed, "mmshap", workdir.shares_file("validation"))
  with np.load(path) as data:
    arrays = {key: data[key] for key in data.files}
  arrays["t_shap"] = arrays["t_shap"] * 0.5  # Shares the meta-models were not trained on.
  arrays["v_shap"] = 1 - arrays["t_shap"]
  np.savez(path, **arrays)
  with pytest.raises(predictor.WorkdirNotReady, match=r"trained on other meta-features.*run the "
                                                       r"main job again"):
    predictor.Predictor.load(changed)


def test_predict_py_on_an_unfinished_workdir_says_what_to_run_in_one_line_with_status_2(tmp_path):
  root = tmp_path / "w"
  os.makedirs(root / "text")  # One stage begun, no main job.
  result = train_subprocess.run_script("predict.py", f"--workdir={root}", f"--input={tmp_path}",
                                       f"--output={tmp_path / 'out'}")
  message = train_subprocess.user_error(result)
  assert message.startswith(f"{root} holds no finished main job ({root / 'meta' / 'config.json'} "
                            "not found): train it first, e.g. python train.py "
                            f"--config=configs/meta.py:toyshop --workdir={root}"), message
  assert not (tmp_path / "out").exists()


def test_cards_colour_each_word_and_region_by_its_own_shapley_value(loaded, test_split_predictions):
  ours = test_split_predictions
  cards = loaded.cards(ours, top_k=2, limit=4)
  assert [card.id for card in cards] == ours.ids[:4].tolist()
  for row, card in enumerate(cards):
    phi, modality = ours.shapley["phi"][row], ours.shapley["player_modality"][row]
    assert "".join(s.text for s in card.segments) == ours.products.titles[row]
    words = {s.player: s.value for s in card.segments if s.player is not None}
    assert words == pytest.approx(dict(enumerate(phi[modality == 0].tolist())))
    assert [r.value for r in card.regions] == pytest.approx(phi[modality == 1].tolist())
    assert card.t_shap == pytest.approx(ours.shapley["t_shap"][row])
    assert card.top_classes[0][0] == ours.classes()[row]
  page = explanations.page(cards, "test")
  assert page.count('<section class="card"') == 4
  assert "http://" not in page and "https://" not in page and "<script" not in page
  assert page.count('src="data:image/png;base64,') == 8  # Each photo inlined, plain and shaded.
  assert f'data-t-shap="{ours.shapley["t_shap"][0]:.6g}"' in page
  assert [b[:2] for b in loaded.region_boxes(4)] == [(0, 0), (0, 0.5), (0.5, 0), (0.5, 0.5)]


def test_a_png_card_shades_the_region_that_raised_the_class_red_and_the_one_that_lowered_it_blue():
  grey = np.full((32, 32, 3), 128, np.uint8)
  boxes = explanations.pooling_boxes((2, 2), (4, 4))
  card = explanations.Card(
      id="x", photo=grey, segments=[explanations.Segment("red", 0, 2.0),
                                    explanations.Segment(" plain")],
      regions=[explanations.Region(box, value) for box, value in zip(boxes, (2.0, 0.0, 0.0, -2.0))],
      t_shap=0.5, v_shap=0.5, explained="test", method="stacked", top_classes=[("a", 0.9)],
      votes=[("text", "a", 0.9)])
  shaded = np.asarray(explanations.shaded_photo(card, 64, labels=False), np.int32)
  top_left, top_right, bottom_right = shaded[24, 24], shaded[24, 40], shaded[40, 40]
  assert top_left[0] > 170 and top_left[2] < 100  # Red.
  np.testing.assert_array_equal(top_right, [128, 128, 128])  # phi 0: untouched.
  assert bottom_right[2] > 150 and bottom_right[0] < 80  # Blue.
  with Image.open(io.BytesIO(card.png())) as image:
    assert image.width > 2 * 192 and image.mode == "RGB"


def test_two_processes_each_read_their_rows_and_gather_them_in_input_order(loaded, new_products,
                                                                          monkeypatch):
  """`classifier.evaluate`, as the predictor calls it, run by two simulated processes (threads):
  each reads only its half of every global batch, and both end with every product's row in input
  order. (Real multi-host runs: not tested here.)"""
  read = loaded.read(new_products)
  records = products.records(read, loaded.class_names)
  local = threading.local()
  barrier, slots = threading.Barrier(2), {}
  seen = {0: [], 1: []}

  def allgather(value, tiled):
    assert tiled
    slots[local.index] = np.asarray(value)
    barrier.wait()
    gathered = np.concatenate([slots[0], slots[1]])
    barrier.wait()
    return gathered

  def preprocess(rows, index):
    seen[index].extend(input_pipeline.as_text(r["id"]) for r in rows)
    return {"id": np.asarray([r["id"] for r in rows]), "label": np.asarray([r["label"] for r in rows]),
            "row": np.asarray([read.ids.index(r["id"]) for r in rows], np.float32)}

  eval_loader = input_pipeline.eval_loader

  def simulated_process_loader(source, preprocess, **options):
    # grain reads batches in a thread of its own: tell `preprocess` which simulated process it is.
    index = local.index
    return eval_loader(source, lambda rows: preprocess(rows, index), **options)

  monkeypatch.setattr(jax, "process_index", lambda: local.index)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(classifier.multihost_utils, "process_allgather", allgather)
  monkeypatch.setattr(classifier.parallel, "to_global", lambda batch, mesh: batch)
  monkeypatch.setattr(classifier.input_pipeline, "eval_loader", simulated_process_loader)
  results, errors = {}, []

  def process(index):
    local.index = index
    try:
      results[index] = classifier.evaluate(lambda params, state, batch: batch["row"][:, None], None,
                                           None, records, preprocess, 8, None)
    except BaseException as error:  # pylint: disable=broad-except
      errors.append(error)
      barrier.abort()

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors, errors
  count = len(read)
  assert count % 8  # A padded last batch.
  for index in range(2):
    np.testing.assert_array_equal(results[index]["ids"], read.ids)
    np.testing.assert_array_equal(results[index]["logits"][:, 0], np.arange(count))
  batches = [range(start, min(start + 8, count)) for start in range(0, count, 8)]
  first_half = {read.ids[i] for rows in batches for i in rows if i - rows.start < 4}
  assert set(seen[0]) <= first_half and set(seen[1]).isdisjoint(first_half - {read.ids[0]})
  assert set(seen[0]) | set(seen[1]) == set(read.ids)


@pytest.fixture(scope="module")
def labelled_split(job, tmp_path_factory):
  """The workdir's test split as new products with their labels (24 products)."""
  return _write_split(str(tmp_path_factory.mktemp("labelled_split")), job[1], labels=True)


def _npz(path):
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def _same_outputs(ours, theirs):
  """predictions.csv byte for byte, mmshap.npz array for array, metrics.json value for value."""
  for name in (workdir.PREDICTIONS, workdir.METRICS):
    with open(os.path.join(ours, name), "rb") as a, open(os.path.join(theirs, name), "rb") as b:
      assert a.read() == b.read(), name
  ours_npz, theirs_npz = (_npz(os.path.join(folder, workdir.SHAPLEY_VALUES))
                          for folder in (ours, theirs))
  assert list(ours_npz) == list(theirs_npz)
  for key, value in theirs_npz.items():
    assert ours_npz[key].dtype == value.dtype and ours_npz[key].shape == value.shape, key
    np.testing.assert_array_equal(ours_npz[key], value, err_msg=key)


def test_chunks_write_what_one_pass_writes_and_cards_stop_at_max_cards(loaded, labelled_split,
                                                                      tmp_path, monkeypatch):
  # Every product's MM-SHAP sampled (KernelSHAP): its estimate is seeded by its position in the
  # whole input, whichever chunk it falls in.
  monkeypatch.setattr(loaded.explainer, "options",
                      dataclasses.replace(loaded.explainer.options, method="kernel", budget=64))
  one_pass = loaded.predict(labelled_split)  # In memory, in one piece, photos held.
  assert not one_pass.shapley["exact"].any()
  read = loaded.read(labelled_split, keep_photos=False)
  assert len(read) == 24 and loaded.chunk_rows(8) == 16  # Chunks of 16 and 8 products.
  summary = predictor.predict_to_folder(loaded, read, str(tmp_path), max_cards=20, chunk_size=8)
  assert summary["products"] == 24
  with open(tmp_path / workdir.PREDICTIONS, "rb") as f:
    assert f.read() == one_pass.csv_text().encode()
  with open(tmp_path / workdir.METRICS) as f:
    assert json.load(f) == json.loads(json.dumps(one_pass.metrics()))
  # mmshap.npz holds what np.savez of the whole arrays wrote.
  written = _npz(tmp_path / workdir.SHAPLEY_VALUES)
  assert list(written) == list(one_pass.shapley)
  for key, value in one_pass.shapley.items():
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  pngs = sorted(os.listdir(tmp_path / workdir.EXPLANATION_PNGS))
  assert len(pngs) == 20 and pngs[-1].startswith("00019-")  # Cards from both chunks, then none.
  with open(tmp_path / workdir.EXPLANATIONS_HTML) as f:
    assert f.read().count('<section class="card"') == 20
  assert not [name for name in os.listdir(tmp_path) if ".partial-" in name]


def test_a_catalogue_is_held_a_chunk_of_photos_at_a_time(loaded, labelled_split, tmp_path,
                                                         monkeypatch):
  read = loaded.read(labelled_split, keep_photos=False)
  assert all(isinstance(image, str) for image in read.images)  # Checked, then dropped.
  records, rows_written = products.records, []
  held = []  # Photos each call of the models had in memory.

  def counted_records(chunk, class_names):
    result = records(chunk, class_names)
    held.append(sum(isinstance(r["image"], (bytes, np.ndarray)) for r in result))
    return result

  write = stream_files.CsvStream.write

  def counted_write(stream, rows):
    rows = list(rows)
    rows_written.append(len(rows))
    write(stream, rows)

  monkeypatch.setattr(products, "records", counted_records)
  monkeypatch.setattr(stream_files.CsvStream, "write", counted_write)
  predictor.predict_to_folder(loaded, read, str(tmp_path), explain=False, chunk_size=8)
  assert held == [16, 8] and rows_written == [16, 8]
  with open(tmp_path / workdir.PREDICTIONS) as f:
    assert [row["id"] for row in csv.DictReader(f)] == read.ids


def test_a_run_that_fails_midway_leaves_no_half_output_file(loaded, labelled_split, tmp_path,
                                                            monkeypatch):
  read = loaded.read(labelled_split, keep_photos=False)
  predict, calls = loaded.predict_products, []

  def second_chunk_fails(chunk, **options):
    calls.append(len(chunk))
    if len(calls) == 2:
      raise KeyboardInterrupt("stopped in the second chunk")
    return predict(chunk, **options)

  monkeypatch.setattr(loaded, "predict_products", second_chunk_fails)
  with pytest.raises(KeyboardInterrupt):
    predictor.predict_to_folder(loaded, read, str(tmp_path), chunk_size=8)
  assert calls == [16, 8]
  assert sorted(os.listdir(tmp_path)) == [workdir.BAD_ROWS]  # No half CSV or npz, no leftovers.


def test_predict_py_as_two_processes_writes_what_one_process_with_two_devices_writes(
    loaded, labelled_split, tmp_path):
  """predict.py in two CPU processes joined by `jax.distributed` over loopback (one device each),
  run while this process (two devices) predicts the same products; chunks of 16 and 8."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  address = f"127.0.0.1:{train_subprocess.free_port()}"
  env = train_subprocess.cpu_env(device_count=1)
  processes = []
  for index in range(2):
    command = [sys.executable, os.path.join(train_subprocess.REPO, "predict.py"),
               f"--workdir={loaded.root}", f"--input={labelled_split}", f"--output={multi}",
               "--chunk_size=8", "--max_cards=2", f"--coordinator_address={address}",
               "--num_processes=2", f"--process_id={index}"]
    processes.append(train_subprocess.start(command, env, str(tmp_path / f"process{index}.log")))
  try:
    assert jax.device_count() == 2 and jax.process_count() == 1
    predictor.predict_to_folder(loaded, loaded.read(labelled_split, keep_photos=False), single,
                                max_cards=2, chunk_size=8)
  finally:
    train_subprocess.finish_all(processes)
  _same_outputs(multi, single)
  with open(os.path.join(multi, workdir.SUMMARY)) as f:
    assert json.load(f)["processes"] == 2
