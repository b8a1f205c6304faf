r"""The main job: every stage of the pipeline, then the MM-SHAP-weighted stacked ensemble.

  python train.py --config=configs/meta.py --workdir=W                  # toyshop, the whole pipeline
  python train.py --config=configs/meta.py:fashion --workdir=W --config.data.manual_dir=DIR
  python train.py --config=configs/meta.py --workdir=W --config.rerun=text,mmshap
  python train.py --config=configs/meta.py --workdir=W --config.mode=eval   # restore, re-report
  python train.py --config=configs/meta.py:taimd17k,paper --workdir=W --config.data.manual_dir=DIR
      # the paper's whole system from its checkpoints (bert-base-uncased, microsoft/resnet-152,
      # openai/clip-vit-base-patch32; --config.text_checkpoint= etc. for folders)
  python train.py --config=configs/meta.py:toyshop,meta_paper --workdir=W   # Table I's meta-MLP only

Upstream stages (jmmshap/pipeline.py: text, image, mmbt, mmshap, in that order, and clip_pretrain
before image where the MMBT or the image learner starts from its tower) run only when their outputs are missing
from W; a finished one is reused, and `rerun` (comma-separated) deletes and reruns the ones it names.
Their configs are nested under `stages`, so any field can be overridden
(`--config.stages.text.num_epochs=2`). The data config is given once, at the top level: every
stage's data fields that `configs/common.py` defines are the same shared fields, so
`--config.data.manual_dir=DIR` (or overriding one stage's copy) changes all of them. Stage-specific
data fields (`image_size`, `max_length`, `vocab_size`, `tokenizer`, CLIP's `image_mean`) stay per
stage. So do the checkpoints, but for three top-level fields that set them for every stage that
starts from one: `text_checkpoint` (text learner and the MMBT's text tower), `image_checkpoint`
(image learner) and `clip_checkpoint` (the MMBT's vision tower); each takes a folder, a `pip:`
package path or a Hugging Face hub name.

`,paper` is the paper's whole system: every stage at its paper setting (configs/<stage>.py's
`,paper`: BERT-base on 120-token titles, ResNet-152 at 224 px, CLIP-MMBT with ViT-B/32 and 4 image
embeddings at 288 px, from the three checkpoints) and the meta-MLP of Table I.

Meta-MLP defaults. The paper (Table I) trains 3C -> 512 -> C with SGD, lr 1e-4, 50,000 full-batch
epochs: `,meta_paper` selects exactly that for the meta-MLP alone (the stages keep their own
configs), and `,paper` includes it. The
default is sized for a 2-core CPU: AdamW (lr 1e-3, weight decay 1e-2, cosine decay) for 500
full-batch steps, a few seconds per meta-model. Plain SGD at lr 1e-4 needs its tens of thousands of
steps; Adam reaches a training loss near 1e-3 within the first 100 steps on toyshop, and 500, 1,500
or 3,000 steps gave the same stacked test macro F1 there. The main job measured on this project's
2-core machine with one MLP per weighting (`cross_fit=0`, the default then): stacked and
mmshap_dataset 0.997, mmshap_sample 0.995, against 0.988 for the best base learner, the MMBT (3m29s
end to end); with 5 cross-fit members (below) on 2026-12-07: stacked, mmshap_dataset and
mmshap_sample 1.000, average 0.997, MMBT 0.987 (2m25s). Each meta-model is now 5 cross-fit members
by default (`cross_fit = 5`, each trained on
four fifths of validation, their mean on test): their out-of-fold predictions score every method on
validation, and predict's default method ('auto') is the best of them (W/meta/selection.json,
jmmshap/ensemble.py). `,paper` and `,meta_paper` keep the paper's single MLP (`cross_fit = 0`), so
'auto' falls back to a fixed preference (mmshap_sample, mmshap_dataset, stacked) there. See
jmmshap/weighting.py for `weighting` and jmmshap/meta.py for `cross_fit` and early stopping.

MM-SHAP in the toyshop main job groups each title into at most 4 text players (trailing words merged
into the last): at most 2**8 coalitions per example instead of up to 2**15, about 15x less time
(67 s instead of 17 min for validation and test, measured on a loaded 2-core machine), and per-example T-SHAP
that correlates at 0.99998 with per-word players (mean absolute difference 0.0006).
`--config.stages.mmshap.max_text_players=0` gives one player per word.
"""

import importlib

import ml_collections

from configs import common
from jmmshap import pipeline


META_PAPER = "meta_paper"  # The `,meta_paper` option: only the meta-MLP at Table I's setting.


def stage_config(name: str, variant: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's config for `variant`: every stage of the pipeline has one."""
  return importlib.import_module(f"configs.{name}").get_config(variant)


def _share_data(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> None:
  """Makes the stage's copies of the top-level data fields the same fields (references)."""
  for key in config.data.keys():
    if key not in stage.data:
      continue
    value = config.data[key]
    stage.data[key] = value if isinstance(value, ml_collections.ConfigDict) else config.data.get_ref(key)


# The checkpoints the stages start from, set once at the top (`--config.text_checkpoint=...`):
# stage field <- top-level field (the pipeline names a checkpoint's problems by these flags).
CHECKPOINT_LINKS = pipeline.CHECKPOINT_FLAGS


def _link_checkpoints(config: ml_collections.ConfigDict) -> None:
  """Top-level `text_checkpoint`, `image_checkpoint`, `clip_checkpoint`, taken from the stage
  configs and then shared with them: one flag changes every stage that starts from it."""
  for field in ("text_checkpoint", "image_checkpoint", "clip_checkpoint"):
    values = {config.stages[stage].get(key) for stage, key, top in CHECKPOINT_LINKS
              if top == field and stage in config.stages}
    if len(values) > 1:
      raise ValueError(f"configs/meta.py: the stages start from different {field}s {values}.")
    config[field] = ml_collections.config_dict.placeholder(str)
    if values and (value := values.pop()) is not None:
      config[field] = value
  for stage, key, top in CHECKPOINT_LINKS:
    if stage in config.stages:
      config.stages[stage][key] = config.get_ref(top)


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, (common.PAPER, META_PAPER))
  paper = common.PAPER in options
  config = ml_collections.ConfigDict()
  config.stage = "meta"
  config.variant = variant
  config.mode = "train"  # "eval": restore the meta-models, recompute the report; runs no stage.
  config.seed = 0  # Meta-MLP init, folds and holdout.
  config.rerun = ""  # Upstream stages to delete and run again, e.g. "text,mmshap".
  config.output_dir = "meta"  # Inside the workdir; another name keeps e.g. several seeds side by side.
  config.data = common.data_config(variant)
  # Each stage keeps its own image size (the ResNet and the MMBT need not share one):
  # --config.stages.image.data.image_size=224.
  del config.data["image_size"]
  config.stages = ml_collections.ConfigDict()
  stage_arg = f"{variant},{common.PAPER}" if paper else variant
  candidates = {name: stage_config(name, stage_arg) for name in pipeline.UPSTREAM}
  # clip_pretrain is in only where a stage starts from its output (the fashion MMBTs).
  for name in pipeline.main_job_stages(candidates):
    _share_data(config, candidates[name])
    config.stages[name] = candidates[name]
  _link_checkpoints(config)
  if variant == "toyshop" and not paper:
    config.stages.mmshap.max_text_players = 4
  elif variant in common.FASHION and not paper:
    # The title as one player and 2 image players: 8 coalitions per example, and 128 examples per
    # call so that a call's 1,024 coalition rows are all real (docs/RESULTS.md: 34 examples/s on
    # 2 CPU cores, validation and test in 6 minutes).
    config.stages.mmshap.update(max_text_players=1, examples_per_group=128)

  config.meta = ml_collections.ConfigDict()
  meta = config.meta
  # One meta-MLP per weighting, comma-separated: none -> 'stacked', dataset -> 'mmshap_dataset',
  # sample -> 'mmshap_sample', complement -> 'mmshap_complement' (beyond the paper; the last two
  # need MM-SHAP on every validation and test example).
  meta.weighting = "none,dataset,sample"
  meta.mmbt_weight = 1.0  # w_mm, the multimodal learner's weight.
  meta.append_shares = False  # Append [T-SHAP, V-SHAP] to the weighted variants' features.
  meta.hidden_size = 512
  meta.num_steps = 500  # Full-batch steps (= epochs).
  meta.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, weight_decay=1e-2, warmup_fraction=0.0, schedule="cosine",
      grad_clip_norm=0.0))
  # k >= 2: k members on stratified folds of validation, whose out-of-fold scores pick predict's
  # default method (0: one member on all of validation; 'auto' then follows a fixed preference).
  meta.cross_fit = 5
  meta.early_stopping = False  # Keep the params of the lowest held-out loss; stop after `patience`.
  meta.holdout_fraction = 0.2  # Held out of validation for early stopping when cross_fit is 0.
  meta.patience = 5  # Evaluations without improvement.
  meta.eval_every_steps = 100  # Steps per jitted scan; held-out loss, progress and log between.
  meta.checkpoint_every_steps = 500  # A multiple of eval_every_steps; also after the last step.
  meta.log_every_steps = 20
  meta.keep_checkpoints = 2
  if paper or META_PAPER in options:
    meta.cross_fit = 0  # Table I's single meta-MLP, trained on all of validation.
    meta.num_steps = 50_000
    meta.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=1e-4, momentum=0.0, nesterov=False, warmup_fraction=0.0,
        schedule="constant", grad_clip_norm=0.0))
    meta.eval_every_steps = 1000
    meta.checkpoint_every_steps = 10_000
    meta.log_every_steps = 100
  return config
