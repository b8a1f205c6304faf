"""Mutation check: plants named, plausible bugs one at a time and runs the tests that should catch each.

  python scripts/mutation_check.py                       # every mutant -> docs/mutation_check.json
  python scripts/mutation_check.py --only=meta_optimizer_never_updates,restore_returns_last_params
  python scripts/mutation_check.py --list                # names, files and target tests only

(from the repository root, with the test extra installed: `pip install -e '.[test]'`). Not part of
the default suite: it runs 49 test sessions plus the baseline, about 12 minutes on 2 cores.

Each mutant is one exact text replacement in one package file (it must occur exactly once, or the
mutant is reported as stale). It is applied to a fresh temporary copy of the repository (package,
tests, configs, train.py, pyproject.toml), never to these files, and the copy is deleted afterwards.
In the copy, `python -m pytest -q -x -p no:cacheprovider <its test files>` runs with that copy first
on PYTHONPATH, under a per-mutant timeout. A mutant is `killed` when pytest reports a failure or
error, `survived` when its tests pass, `timeout` when they run past the limit (counted as not killed),
and `stale` when its text is no longer in the file. First, unless --no-baseline, the same test files
run once unmutated in a copy: a failure there would make every kill meaningless, so the check stops.

The JSON (`--output`) lists, per mutant: name, file, description, tests, status, killed, seconds,
the first failing test, and pytest's return code; with the score and the total time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("jmmshap", "tests", "configs", "scripts", "train.py", "predict.py", "pyproject.toml",
          "README.md")
PYTEST = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider")


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  file: str  # Relative to the repository root.
  old: str  # Exact text, found exactly once in `file`.
  new: str
  description: str
  tests: tuple[str, ...]


SHAPLEY, MMSHAP = ("tests/test_shapley.py",), ("tests/test_mmshap.py",)
GAMES = ("tests/test_games.py", "tests/test_players.py")
WEIGHTING, META, ENSEMBLE = ("tests/test_weighting.py",), ("tests/test_meta.py",), ("tests/test_ensemble.py",)
CLASSIFIER, TRAIN_LIB = ("tests/test_classifier.py",), ("tests/test_train_lib.py",)
METRICS, INPUT = ("tests/test_metrics.py",), ("tests/test_input_pipeline.py",)
# Test node ids, not whole files: the image options' tests train, so a mutant runs only its own.
PHOTOS = ("tests/test_photos.py",)
PHOTO_HASHES = ("tests/test_photo_hashes.py",)
CROPS = PHOTOS
FIRST_LOSS = ("tests/test_classifier.py::test_the_first_logged_loss_is_the_smoothed_loss_of_the_"
              "first_cropped_and_flipped_batch",)
EMA_FORMULA = ("tests/test_train_lib.py::test_ema_is_the_debiased_moving_average_of_every_iterate_"
               "and_copies_non_float_state",)
EMA_BEST = ("tests/test_classifier.py::test_the_moving_average_is_checkpointed_and_is_what_best_holds",)
EMA_OUTPUTS = ("tests/test_classifier.py::test_validation_test_and_eval_mode_use_the_moving_average_"
               "with_flip_averaging",)
MMBT_ON_IMAGE_LEARNER = ("tests/test_classifier.py::test_an_mmbt_on_the_image_learners_resnet_"
                         "starts_from_its_export",)
EVAL_OPTIONS = ("tests/test_eval_options.py::test_each_row_is_the_params_and_flip_setting_it_names",)

MUTANTS = (
    # Shapley engine.
    Mutant("permutation_std_error_13x_too_large", "jmmshap/shapley.py",
           "std_error = contributions.std(axis=0, ddof=1) / np.sqrt(contributions.shape[0])",
           "std_error = contributions.std(axis=0, ddof=1)",
           "Permutation standard error without the 1/sqrt(draws) factor (13x at 166 pairs).",
           SHAPLEY),
    Mutant("permutation_std_error_too_small", "jmmshap/shapley.py",
           "std_error = contributions.std(axis=0, ddof=1) / np.sqrt(contributions.shape[0])",
           "std_error = contributions.std(axis=0, ddof=1) / contributions.shape[0]",
           "Permutation standard error divided by the draws instead of their square root.",
           SHAPLEY),
    Mutant("shapley_weight_off_by_one", "jmmshap/shapley.py",
           "1.0 / (num_players * math.comb(num_players - 1, s))",
           "1.0 / (num_players * math.comb(num_players, s))",
           "Shapley weight of a coalition size with C(p, s) instead of C(p - 1, s).", SHAPLEY),
    Mutant("kernel_sizes_drawn_uniformly", "jmmshap/shapley.py",
           "size_mass = 1.0 / (sizes * (num_players - sizes)).astype(jnp.float32)",
           "size_mass = jnp.ones(sizes.shape, jnp.float32)",
           "KernelSHAP draws coalition sizes uniformly instead of by the Shapley kernel.", SHAPLEY),
    Mutant("permutation_gain_against_empty", "jmmshap/shapley.py",
           "gains = jnp.diff(chain, axis=1)",
           "gains = chain[:, 1:] - chain[:, :1]",
           "A player's permutation gain measured against the empty coalition, not its predecessor.",
           SHAPLEY),
    # MM-SHAP.
    Mutant("t_shap_from_signed_phi", "jmmshap/players.py",
           "magnitude = np.abs(np.where(modality == NO_PLAYER, 0.0, np.asarray(phi, np.float64)))",
           "magnitude = np.where(modality == NO_PLAYER, 0.0, np.asarray(phi, np.float64))",
           "T-SHAP from signed Shapley values instead of their absolute mass.", MMSHAP),
    Mutant("explainer_ignores_tokens_per_player", "jmmshap/mmshap.py",
           "tokens_per_player=self.options.tokens_per_player,",
           "tokens_per_player=1,",
           "text_players='tokens' groups one token per player whatever tokens_per_player says.",
           MMSHAP),
    Mutant("permutation_option_computed_exactly", "jmmshap/mmshap.py",
           'if method in ("auto", "exact") and num_players[s] <= limit]',
           'if method != "kernel" and num_players[s] <= limit]',
           "method='permutation' silently computes small games exactly.", MMSHAP),
    Mutant("attention_masking_option_ignored", "jmmshap/games.py",
           "  if changes:\n    model.config",
           "  if False:\n    model.config",
           "with_masking leaves the trained masking in place (attention masking never applied).",
           MMSHAP),
    Mutant("explainer_ignores_given_targets", "jmmshap/mmshap.py",
           "target = prediction if targets is None else int(targets[slot])",
           "target = prediction",
           "The explainer explains the prediction even when targets are given.", MMSHAP),
    Mutant("authors_grid_rounded_down", "jmmshap/players.py",
           "return max(1, math.ceil(math.sqrt(num_tokens)))",
           "return max(1, math.isqrt(num_tokens))",
           "The patch grid is floor(sqrt(tokens)) a side instead of the authors' ceiling.", GAMES),
    Mutant("patches_numbered_column_major", "jmmshap/players.py",
           "rows[:, None] * grid + cols[None, :]",
           "cols[None, :] * grid + rows[:, None]",
           "Patches numbered down the columns, not along the rows as the authors do.", GAMES),
    Mutant("patch_fill_ignored", "jmmshap/games.py",
           "jnp.where(keep[..., None], pixels, jnp.asarray(fill, pixels.dtype))",
           "jnp.where(keep[..., None], pixels, jnp.zeros((), pixels.dtype))",
           "A masked patch is always 0, whatever fill says.", GAMES),
    Mutant("patch_text_masking_token_ignored", "jmmshap/games.py",
           "input_ids = jnp.where(text_keep, input_ids, mask_token_id)",
           "input_ids = jnp.where(text_keep, input_ids, input_ids)",
           "A patch game's masked text tokens stay as they are (token masking never applied).",
           GAMES),
    Mutant("target_label_explains_prediction", "jmmshap/mmshap_stage.py",
           '  if config.target == "label":\n    return labels',
           '  if config.target == "label":\n    return None',
           "The mmshap stage's target='label' explains the predicted class.",
           ("tests/test_mmshap_stage.py",)),
    # Meta weighting.
    Mutant("dataset_shares_from_test", "jmmshap/weighting.py",
           'mean_shares = dataset_shares(shares["validation"])',
           'mean_shares = dataset_shares(shares["test"])',
           "Dataset MM-SHAP shares averaged over the test split (test leakage).", WEIGHTING),
    Mutant("sample_fallback_from_own_split", "jmmshap/weighting.py",
           "sample_shares(shares, mean_shares, split, weighting)",
           "sample_shares(shares, dataset_shares(shares), split, weighting)",
           "Undefined per-example shares fall back to their own split's mean (test's on test).",
           WEIGHTING),
    Mutant("text_and_image_shares_swapped", "jmmshap/weighting.py",
           'parts = [text * logits["text"], image * logits["image"],',
           'parts = [image * logits["text"], text * logits["image"],',
           "The text logits are scaled by V-SHAP and the image logits by T-SHAP.", WEIGHTING),
    # Meta training, early stopping, restore.
    Mutant("meta_optimizer_never_updates", "jmmshap/meta.py",
           "return optax.apply_updates(params, updates), opt_state, loss, accuracy",
           "return params, opt_state, loss, accuracy",
           "The meta-MLP's step computes updates but never applies them.", ENSEMBLE),
    Mutant("meta_loss_ignores_train_mask", "jmmshap/meta.py",
           "loss = (train_lib.cross_entropy(logits, labels) * weights).sum() / total",
           "loss = train_lib.cross_entropy(logits, labels).mean()",
           "Meta members train on their held-out examples (and padding) too.", META + ENSEMBLE),
    Mutant("early_stopping_keeps_last_step", "jmmshap/meta.py",
           "improved = loss < kept_loss",
           "improved = np.ones_like(loss < kept_loss)",
           "Early stopping treats every evaluation as an improvement: the last params are kept.",
           META),
    Mutant("early_stopping_patience_off_by_one", "jmmshap/meta.py",
           "(evals_since_improvement >= meta_config.patience)",
           "(evals_since_improvement > meta_config.patience)",
           "Training stops one evaluation after `patience` evaluations without improvement.", META),
    Mutant("restore_returns_last_params", "jmmshap/meta.py",
           'return np.asarray(predict(state["kept"], padded))',
           'return np.asarray(predict(state["params"], padded))',
           "restore predicts with the last params instead of the kept (best held-out) ones.", META),
    Mutant("holdout_also_trained_on", "jmmshap/meta.py",
           "holdout = stratified_holdout(labels, meta_config.holdout_fraction, seed)[None, :]\n"
           "    return ~holdout, holdout",
           "holdout = stratified_holdout(labels, meta_config.holdout_fraction, seed)[None, :]\n"
           "    return np.ones_like(holdout), holdout",
           "Early stopping's held-out examples stay in the training set.", META),
    Mutant("cross_fit_test_from_one_member", "jmmshap/ensemble.py",
           "probabilities[data.method] = members.mean(axis=0)",
           "probabilities[data.method] = members[0]",
           "Cross-fit test probabilities from the first member instead of the members' mean.",
           ENSEMBLE),
    Mutant("out_of_fold_score_in_fold", "jmmshap/ensemble.py",
           "member = holdout[:, rows].argmax(axis=0)",
           "member = (~holdout[:, rows]).argmax(axis=0)",
           "Out-of-fold validation scores computed with a member that trained on the example.",
           ENSEMBLE),
    # Checkpoint selection and the learning-rate schedule.
    Mutant("best_chosen_on_test", "jmmshap/classifier.py",
           'result = evaluate_split("validation", evaluated["params"], evaluated["model_state"])',
           'result = evaluate_split("test", evaluated["params"], evaluated["model_state"])',
           "A classifier's best/ checkpoint is selected on the test split.", CLASSIFIER),
    Mutant("best_is_always_latest", "jmmshap/train_lib.py",
           "if selection.improves(scores[selection.metric], best_score):",
           "if True:",
           "best/ is replaced at every evaluation: it holds the latest, not the best.", CLASSIFIER),
    Mutant("best_score_never_raised", "jmmshap/train_lib.py",
           "          best_score = scores[selection.metric]\n",
           "",
           "The best score is never updated, so every evaluation beats the initial one.",
           CLASSIFIER),
    Mutant("best_replaced_on_ties", "jmmshap/train_lib.py",
           "return score > best if self.higher_is_better else score < best",
           "return score >= best if self.higher_is_better else score <= best",
           "An equal validation score replaces the earlier best checkpoint.", CLASSIFIER),
    Mutant("test_outputs_from_validation", "jmmshap/classifier.py",
           'else evaluate_split(split, best["params"], best["model_state"]))',
           'else evaluate_split("validation", best["params"], best["model_state"]))',
           "logits_test.npz and the test metrics are computed on the validation split.", TRAIN_LIB),
    Mutant("cosine_decay_ignores_warmup", "jmmshap/train_lib.py",
           "decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))",
           "decay = optax.cosine_decay_schedule(peak, max(total_steps, 1))",
           "Cosine decay spans every step, so it has not reached 0 at the end after a warm-up.",
           TRAIN_LIB),
    Mutant("linear_decay_floor", "jmmshap/train_lib.py",
           "decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))",
           "decay = optax.linear_schedule(peak, 0.1 * peak, max(total_steps - warmup, 1))",
           "Linear decay ends at a tenth of the peak instead of 0.", TRAIN_LIB),
    Mutant("warmup_one_step_long", "jmmshap/train_lib.py",
           "optax.linear_schedule(0.0, peak, warmup)",
           "optax.linear_schedule(0.0, peak, warmup + 1)",
           "Warm-up one step longer than the decay's start: the peak is never reached.", TRAIN_LIB),
    # Metrics.
    Mutant("macro_average_over_absent_classes", "jmmshap/metrics.py",
           'out[f"{name}_macro"] = float(scores[name][present].mean())',
           'out[f"{name}_macro"] = float(scores[name].mean())',
           "Macro averages include classes neither present nor predicted.", METRICS),
    Mutant("precision_and_recall_swapped", "jmmshap/metrics.py",
           "predicted = counts.sum(axis=0)",
           "predicted = counts.sum(axis=1)",
           "Precision divides by the class's support instead of its predictions.", METRICS),
    # The input pipeline's split handling.
    Mutant("same_order_every_epoch", "jmmshap/input_pipeline.py",
           "return np.random.default_rng([seed, epoch]).permutation(num_examples)",
           "return np.random.default_rng(seed).permutation(num_examples)",
           "Training examples come in the same order every epoch.", INPUT),
    Mutant("eval_drops_the_last_partial_batch", "jmmshap/input_pipeline.py",
           "return -(-self.num_examples // self.global_batch_size)",
           "return self.num_examples // self.global_batch_size",
           "Evaluation skips the examples of a last, partial batch.", INPUT),
    Mutant("grain_state_not_restored", "jmmshap/train_lib.py",
           '    batches.set_state(position["iterator"])',
           "    pass",
           "A resumed run keeps the saved first step but not grain's position: it replays from the "
           "start.", ("tests/test_crash_resume.py::test_sigkilled_run_restarted_ends_with_the_"
                      "uninterrupted_params",)),
    Mutant("grain_workers_outlive_a_killed_run", "jmmshap/input_pipeline.py",
           "        worker_init_fn=_die_with_the_parent)",
           "        worker_init_fn=None)",
           "grain workers of a SIGKILLed run keep running without their parent.",
           ("tests/test_crash_resume.py::test_grain_workers_of_a_killed_run_end_with_it",)),
    Mutant("grain_reads_far_ahead", "jmmshap/input_pipeline.py",
           "                                                      prefetch_buffer_size=max(1, threads)))",
           "                                                      prefetch_buffer_size=500))",
           "The reading threads run up to 500 batches ahead of a slow consumer.", INPUT),
    Mutant("workers_see_other_rows", "jmmshap/input_pipeline.py",
           "  rows = process_slice(global_batch_size)\n",
           "  rows = slice(None) if worker_count else process_slice(global_batch_size)\n",
           "With workers, every process reads whole batches instead of its block of rows.",
           ("tests/test_input_pipeline.py::test_worker_processes_give_the_batches_of_the_main_"
            "process",)),
    Mutant("draft_not_used", "jmmshap/input_pipeline.py",
           '        image.draft("RGB", (size, size))',
           "        pass",
           "Large JPEGs decoded at full size before the resize.", INPUT),
    Mutant("device_normalisation_off_by_mean", "jmmshap/photos.py",
           "return (pixels.astype(jnp.float32) / 255.0 - mean) / std",
           "return (pixels.astype(jnp.float32) / 255.0) / std",
           "Photos normalised on the device without subtracting the mean.", PHOTOS),
    Mutant("train_step_ignores_prepare_batch", "jmmshap/train_lib.py",
           '      batch = prepare_batch(batch, state["step"])',
           '      batch = prepare_batch(batch, state["step"] * 0)',
           "Every step augments with step 0's draws.", FIRST_LOSS + (
               "tests/test_train_lib.py::test_the_train_step_prepares_each_batch_with_its_own_step",)),
    Mutant("toyshop_splits_share_their_draws", "jmmshap/toyshop.py",
           "rng = np.random.default_rng([spec.seed, _SPLIT_CODES[split], class_index, index])",
           "rng = np.random.default_rng([spec.seed, class_index, index])",
           "Toyshop's validation and test products are copies of the first training products.",
           ("tests/test_toyshop.py",)),
    Mutant("stratified_split_fractions_swapped", "jmmshap/builders.py",
           'num_validation = int(len(group) * _SPLIT_FRACTIONS["validation"])',
           'num_validation = int(len(group) * _SPLIT_FRACTIONS["test"])',
           "A product folder without a split column gets 20% validation instead of 10%.",
           ("tests/test_builders.py",)),
    Mutant("eval_padding_counted_as_examples", "jmmshap/input_pipeline.py",
           'batch["mask"] = real.astype(np.float32)',
           'batch["mask"] = np.ones_like(real, np.float32)',
           "Padding rows of the last evaluation batch are marked as real examples.", INPUT),
    # The image learner's options (issue #20).
    Mutant("augmentation_the_same_every_step", "jmmshap/photos.py",
           "key = jax.random.fold_in(jax.random.key(seed), step)",
           "key = jax.random.key(seed)",
           "Augmentation draws the same crops and flips at every step.", CROPS),
    Mutant("crop_area_taken_as_side_fraction", "jmmshap/photos.py",
           "crop_width = jnp.clip(jnp.sqrt(fraction * height * width * ratio), 1.0, width)",
           "crop_width = jnp.clip(fraction * jnp.sqrt(height * width * ratio), 1.0, width)",
           "A crop's width scaled by the drawn area instead of its square root.", CROPS),
    Mutant("flips_read_a_crop_draw", "jmmshap/photos.py",
           "images = random_flip(images, draws[:, 0])",
           "images = random_flip(images, draws[:, -1])",
           "Flips read a crop's draw: turning crops on changes which photos are mirrored.", CROPS),
    Mutant("crops_off_in_training", "jmmshap/classifier.py",
           "crop_area=tuple(config.crop_area) if config.get(\"random_crop\") else None,",
           "crop_area=None,",
           "The image stage trains without the crops its config asks for.", FIRST_LOSS),
    Mutant("label_smoothing_off_in_training", "jmmshap/classifier.py",
           "make_loss(train_graphdef, stage.inputs, config.get(\"label_smoothing\", 0.0))",
           "make_loss(train_graphdef, stage.inputs)",
           "The classifier stages train on plain cross-entropy whatever label_smoothing says.",
           FIRST_LOSS),
    Mutant("label_smoothing_mass_not_spread", "jmmshap/train_lib.py",
           "targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)",
           "targets = (1 - label_smoothing) * jax.nn.one_hot(labels, logits.shape[-1])",
           "Label smoothing scales the one-hot target down without spreading a / C over the classes.",
           ("tests/test_train_lib.py::test_label_smoothing_zero_is_the_plain_loss_and_otherwise_the_"
            "smoothed_targets_formula",)),
    Mutant("ema_not_debiased", "jmmshap/train_lib.py",
           "weight = (1.0 - decay) / -jnp.expm1(step.astype(jnp.float32) * math.log(decay))",
           "weight = jnp.asarray(1.0 - decay)",
           "The EMA without its bias correction: early averages lean towards the initial params.",
           EMA_FORMULA),
    Mutant("ema_validated_on_raw_params", "jmmshap/classifier.py",
           "evaluated = train_lib.evaluated_model(state)  # The moving average where there is one.",
           "evaluated = state",
           "Validation (and selection, and the kept validation logits) uses the raw params, not "
           "the EMA.", EMA_OUTPUTS),
    Mutant("ema_not_what_best_keeps", "jmmshap/classifier.py",
           "selection=SELECTION, best_model=train_lib.evaluated_model, mesh=mesh,",
           "selection=SELECTION, best_model=lambda state: {\"params\": state[\"params\"], "
           "\"model_state\": state[\"model_state\"]}, mesh=mesh,",
           "best/ (so eval mode and the written logits) keeps the raw params instead of the EMA.",
           EMA_BEST),
    Mutant("flip_average_off", "jmmshap/classifier.py",
           "flip_average=bool(config.get(\"eval_flip_average\")),",
           "flip_average=False,",
           "eval_flip_average=True evaluates the photos alone.", EMA_OUTPUTS),
    Mutant("predictor_logits_never_flip", "jmmshap/classifier.py",
           "flip_average=bool(trained.config.get(\"eval_flip_average\")),",
           "flip_average=False,",
           "A restored stage (the predictor's) evaluates photos alone although it was trained with "
           "eval_flip_average=True.",
           ("tests/test_classifier.py::test_a_restored_stage_gives_any_records_the_logits_it_wrote_"
            "flip_averaging_included",)),
    Mutant("flip_average_upside_down", "jmmshap/classifier.py",
           "mirrored = {**batch, \"pixel_values\": batch[\"pixel_values\"][:, :, ::-1]}",
           "mirrored = {**batch, \"pixel_values\": batch[\"pixel_values\"][:, ::-1]}",
           "Flip averaging mirrors the photos top-bottom instead of left-right.",
           ("tests/test_classifier.py::test_flip_averaged_evaluation_is_the_mean_of_the_photo_and_"
            "mirror_logits",)),
    Mutant("clip_learner_normalised_as_imagenet", "jmmshap/classifier.py",
           "_resolve_normalisation(config, clip=kind == \"clip\")",
           "_resolve_normalisation(config, clip=False)",
           "The CLIP image learner normalises photos with ImageNet's statistics, not its tower's.",
           ("tests/test_classifier.py::test_an_image_learner_on_the_clip_pretrain_tower_starts_"
            "from_it_trains_and_is_reusable",)),
    # Small-map convolutions as matmuls; workdir-relative fingerprints.
    Mutant("conv_patches_transposed", "jmmshap/models/resnet.py",
           "for i in range(kernel_height) for j in range(kernel_width)], axis=-1)",
           "for j in range(kernel_width) for i in range(kernel_height)], axis=-1)",
           "conv_as_matmul orders the patch features column-major, not as the kernel's rows.",
           ("tests/test_resnet.py::test_conv_as_matmul_is_the_padded_strided_convolution",)),
    Mutant("matmul_route_off_at_its_threshold", "jmmshap/models/resnet.py",
           "if height * width <= self.matmul_conv_positions:",
           "if height * width < self.matmul_conv_positions:",
           "2x2 output maps (the ones XLA's CPU convolution is slow on) keep the convolution.",
           ("tests/test_resnet.py::test_small_output_maps_run_as_a_matmul_with_the_convolutions_"
            "numbers",)),
    Mutant("fingerprint_keeps_absolute_workdir_paths", "jmmshap/workdir.py",
           "  settings = _inside_as_workdir_paths(settings, root)\n",
           "",
           "A fingerprint holds its workdir's location, so a copied workdir's stages turn stale.",
           ("tests/test_workdir.py::test_a_copied_workdir_keeps_its_stages_and_older_absolute_"
            "fingerprints_still_match",)),
    Mutant("reuse_check_reads_workdir_path_unresolved", "jmmshap/classifier.py",
           "  config = workdir.resolve_paths(config, root)\n  if config.stage in CLASSIFIERS:",
           "  if config.stage in CLASSIFIERS:",
           "The main job's reuse check opens a `workdir:` checkpoint path as it is (a finished stage "
           "that starts from clip_pretrain's export cannot be reused).",
           ("tests/test_classifier.py::test_an_image_learner_on_the_clip_pretrain_tower_starts_"
            "from_it_trains_and_is_reusable",)),
    # The MMBT on the image learner's ResNet (its export).
    Mutant("mmbt_resnet_normalised_as_clip", "jmmshap/classifier.py",
           "_resolve_normalisation(config, clip=config.model.image_tower == \"clip\")",
           "_resolve_normalisation(config, clip=True)",
           "An MMBT on a ResNet tower normalises photos with CLIP's statistics, not ImageNet's.",
           MMBT_ON_IMAGE_LEARNER),
    Mutant("mmbt_resnet_tower_ignores_its_checkpoint", "jmmshap/classifier.py",
           "if config.get(\"init_from_image\"):  # E.g. the image learner's export",
           "if False:  # E.g. the image learner's export",
           "model.image_tower='resnet' starts from scratch whatever init_from_image names.",
           MMBT_ON_IMAGE_LEARNER),
    Mutant("unread_optional_stage_still_runs", "jmmshap/pipeline.py",
           "  wanted = main_job_stages(config.stages)\n",
           "  wanted = [name for name in UPSTREAM if name in config.stages]\n",
           "The main job pretrains clip_pretrain's tower although no stage reads it any more.",
           ("tests/test_pipeline.py::test_the_main_job_skips_an_optional_stage_that_no_stage_reads_"
            "after_overrides",)),
    # Issue #28: a catalogue's photos hashed once, read once per main job, prepared in a stream.
    Mutant("hash_cache_key_without_ctime", "jmmshap/photo_hashes.py",
           "return (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, "
           "status.st_dev)",
           "return (status.st_size, status.st_mtime_ns, 0, status.st_ino, status.st_dev)",
           "The cache trusts size and mtime: a same-size rewrite or a `cp -p` restore goes unseen.",
           PHOTO_HASHES),
    Mutant("hash_cache_trusts_racy_entries", "jmmshap/photo_hashes.py",
           "  return max(mtime_ns, ctime_ns) < hashed_ns - RACY_WINDOW_NS",
           "  return True",
           "A photo changed in the clock tick of its hashing keeps its stale digest.", PHOTO_HASHES),
    Mutant("hash_cache_never_consulted", "jmmshap/photo_hashes.py",
           "        if key == keys[i] and _trusted(key, hashed_ns):",
           "        if False:",
           "Every rerun reads every photo again (the cache is written, never read).",
           PHOTO_HASHES + ("tests/test_builders.py::test_an_unchanged_catalogue_is_not_read_again",)),
    Mutant("nested_job_forgets_the_catalogues_read", "jmmshap/builders.py",
           "  _configs_of_this_job = {} if outer is None else outer",
           "  _configs_of_this_job = outer or {}",
           "A stage run inside the main job reads and fingerprints the catalogue again.",
           ("tests/test_pipeline.py::test_the_main_job_reads_its_catalogue_once_for_all_its_stages",)),
    Mutant("shards_ignore_their_byte_bound", "jmmshap/preparation.py",
           "size + photo_bytes > _SHARD_BYTES or ", "",
           "One shard holds a whole split: memory grows with the catalogue.",
           ("tests/test_builders.py::test_rows_stream_into_shards_of_bounded_bytes",)),
    Mutant("workers_answer_out_of_order", "jmmshap/preparation.py",
           "          yield from pending.popleft().result()\n      while pending:",
           "          yield from pending.pop().result()\n      while pending:",
           "Photos checked by workers are paired with the wrong rows once the window is full.",
           ("tests/test_builders.py::test_worker_processes_prepare_what_this_process_prepares_bad_"
            "rows_included",)),
    Mutant("chunks_restart_mmshap_seeds", "jmmshap/mmshap_stage.py",
           "indices=indices + first_index,", "indices=indices,",
           "Each predict chunk seeds its sampled MM-SHAP from position 0: chunking changes phi.",
           ("tests/test_predict.py::test_chunks_write_what_one_pass_writes_and_cards_stop_at_max_"
            "cards",)),
    # scripts/eval_options.py: the evaluation-only options measured on one finished run.
    Mutant("eval_options_ema_row_is_the_trained_params", "scripts/eval_options.py",
           "variants[\"ema\"] = train_lib.evaluated_model(state)",
           "variants[\"ema\"] = variants[\"trained\"]",
           "The script's EMA rows evaluate the trained params.", EVAL_OPTIONS),
    Mutant("eval_options_never_flips", "scripts/eval_options.py",
           "classifier.jit_eval_step(graphdef, stage.inputs, mesh, flip,",
           "classifier.jit_eval_step(graphdef, stage.inputs, mesh, False,",
           "The script's flip-averaged rows evaluate the photos alone.", EVAL_OPTIONS),
    # Issue #29: the collapse benchmark, the compensating weighting and predict's selection.
    Mutant("complement_weighting_is_the_papers", "jmmshap/weighting.py",
           "text_share, image_share = 1.0 - text_share, 1.0 - image_share",
           "text_share, image_share = text_share, image_share",
           "'complement' scales each learner by the MMBT's share, as the paper's weighting does.",
           ("tests/test_weighting.py",)),
    Mutant("shortcut_names_the_class_in_test_too", "jmmshap/toyshop.py",
           ' and split == "train"', "",
           "The line word names the class in validation and test too: no collapse, only a shortcut.",
           ("tests/test_toyshop.py",)),
    Mutant("shortcut_never_trains", "jmmshap/toyshop.py",
           "own = draws.uniform() < spec.shortcut_strength", "own = draws.uniform() < 0.0",
           "Line words are random at every strength: the MMBT never collapses.",
           ("tests/test_toyshop.py",)),
    Mutant("paired_test_unpaired", "scripts/collapse_benchmark.py",
           "test = stats.ttest_rel(values, baseline)", "test = stats.ttest_ind(values, baseline)",
           "Seeds compared as independent samples: the per-seed pairing is lost.",
           ("tests/test_collapse_benchmark.py::test_paired_test_over_seeds_pins_t_test_and_exact_sign_"
            "flip_values",)),
    Mutant("selection_picks_the_worst", "jmmshap/ensemble.py",
           "key=lambda method: (-scores[method], order[method])",
           "key=lambda method: (scores[method], order[method])",
           "predict's 'auto' takes the lowest validation macro F1.", ENSEMBLE),
    Mutant("selection_takes_a_partial_holdout", "jmmshap/ensemble.py",
           'if held_out and held_out["examples"] == len(labels):', "if held_out:",
           "A meta-model scored on an early-stopping holdout is ranked against scores on all of "
           "validation.", ENSEMBLE),
    Mutant("auto_ignores_the_selection", "jmmshap/ensemble.py",
           'method = next((name for name in selection["ranking"] if name in available), None)',
           "method = next((name for name in PREFERENCE if name in available), None)",
           "predict's 'auto' is the fixed preference again, whatever the workdir chose.", ENSEMBLE),
)


def copy_repository(destination: str) -> None:
  for name in COPIED:
    source = os.path.join(REPO, name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(destination, name),
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy2(source, os.path.join(destination, name))


def apply(mutant: Mutant, root: str) -> bool:
  """Applies the mutant in `root`; False when its text is not in the file exactly once."""
  path = os.path.join(root, mutant.file)
  with open(path) as f:
    text = f.read()
  if text.count(mutant.old) != 1:
    return False
  with open(path, "w") as f:
    f.write(text.replace(mutant.old, mutant.new))
  return True


def run_tests(root: str, tests: Sequence[str], timeout: float) -> tuple[int | None, str, float]:
  """(pytest's return code or None on timeout, its output, seconds) in the copy at `root`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  started = time.perf_counter()
  try:
    child = subprocess.run([sys.executable, *PYTEST, *tests], cwd=root, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                           check=False)
    return child.returncode, child.stdout, time.perf_counter() - started
  except subprocess.TimeoutExpired as error:
    output = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
    return None, output, time.perf_counter() - started


def first_failure(output: str) -> str | None:
  for line in output.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
      return line[:300]
  return None


def check_imports_the_copy(root: str) -> None:
  env = dict(os.environ, PYTHONPATH=root)
  found = subprocess.run([sys.executable, "-c", "import jmmshap; print(jmmshap.__file__)"], cwd=root,
                         env=env, text=True, capture_output=True, check=True).stdout.strip()
  if not os.path.realpath(found).startswith(os.path.realpath(root)):
    raise SystemExit(f"the copy in {root} imports jmmshap from {found}: mutants would not be seen.")


def evaluate(mutant: Mutant, timeout: float) -> dict:
  with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as root:
    copy_repository(root)
    record = {"name": mutant.name, "file": mutant.file, "description": mutant.description,
              "tests": list(mutant.tests)}
    if not apply(mutant, root):
      return {**record, "status": "stale", "killed": False, "seconds": 0.0, "returncode": None,
              "first_failure": None}
    returncode, output, seconds = run_tests(root, mutant.tests, timeout)
  if returncode is None:
    status = "timeout"
  elif returncode in (1, 2):  # Tests failed, or errored / were interrupted on an error.
    status = "killed"
  elif returncode == 0:
    status = "survived"
  else:  # 3-5: internal error, usage error, no tests collected: the check itself is broken.
    status = f"error (pytest exit {returncode})"
  tail = None if status in ("killed", "survived") else output[-2000:]
  return {**record, "status": status, "killed": status == "killed", "seconds": round(seconds, 1),
          "returncode": returncode, "first_failure": first_failure(output),
          **({"output_tail": tail} if tail else {})}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="Comma-separated mutant names (default: all).")
  parser.add_argument("--output", default=os.path.join(REPO, "docs", "mutation_check.json"))
  parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per mutant's tests.")
  parser.add_argument("--no-baseline", action="store_true",
                      help="Skip the unmutated run of the target test files.")
  parser.add_argument("--list", action="store_true", help="List the mutants and exit.")
  args = parser.parse_args(argv)

  names = [name for name in args.only.split(",") if name]
  unknown = sorted(set(names) - {m.name for m in MUTANTS})
  if unknown:
    parser.error(f"unknown mutants: {', '.join(unknown)}")
  mutants = [m for m in MUTANTS if not names or m.name in names]
  if args.list:
    for mutant in mutants:
      print(f"{mutant.name:40s} {mutant.file:28s} {' '.join(mutant.tests)}")
    return 0

  started = time.perf_counter()
  baseline = None
  if not args.no_baseline:
    files = sorted({test for mutant in mutants for test in mutant.tests})
    with tempfile.TemporaryDirectory(prefix="mutation_baseline_") as root:
      copy_repository(root)
      check_imports_the_copy(root)
      returncode, output, seconds = run_tests(root, files, args.timeout * len(files))
    baseline = {"tests": files, "returncode": returncode, "seconds": round(seconds, 1)}
    print(f"baseline: {len(files)} test files, exit {returncode}, {seconds:.0f} s", flush=True)
    if returncode != 0:
      print(output[-5000:])
      print("the unmutated tests do not pass: fix them before checking mutants.")
      return 2

  results = []
  for index, mutant in enumerate(mutants, 1):
    result = evaluate(mutant, args.timeout)
    results.append(result)
    print(f"[{index}/{len(mutants)}] {mutant.name}: {result['status']} ({result['seconds']:.0f} s)"
          + (f"  <- {result['first_failure']}" if result["first_failure"] else ""), flush=True)

  killed = sum(result["killed"] for result in results)
  report = {
      "command": "python scripts/mutation_check.py" + (f" --only={args.only}" if names else ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
      "timeout_seconds_per_mutant": args.timeout,
      "score": {"killed": killed, "total": len(results),
                "survived": [r["name"] for r in results if r["status"] == "survived"],
                "not_killed_otherwise": [r["name"] for r in results
                                         if r["status"] not in ("killed", "survived")]},
      "total_seconds": round(time.perf_counter() - started, 1),
      "baseline": baseline, "mutants": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  print(f"mutation score: {killed}/{len(results)} killed; {args.output}")
  return 0 if killed == len(results) else 1


if __name__ == "__main__":
  sys.exit(main())
