r"""Image learner: a ResNet classifier on the product photo (or a CLIP vision tower with a linear head).

Variants: toyshop (default; a narrow ResNet-18 with a small-image stem, seconds on a CPU), fashion,
taimd17k. Depth 18/34/50/101/152 is `--config.model.depth`; `--config.model.width=64` gives the
standard widths (ResNet-152: `--config.model.depth=152 --config.model.width=64`), and
`--config.init_from=DIR` starts from a HF ResNet folder or a torchvision state-dict file.

Options for a stronger learner, off by default; the fashion variants turn on flips, smoothing and
flip averaging (docs/TRAINING.md, "The image learner's options"; measured in docs/RESULTS.md on fashion
at 64 px: 12 epochs with them gained 0.043-0.047 test macro F1; crops, even of 70-100%, cost
0.01-0.02, and the EMA 0.005):
  --config.random_flip=True --config.random_crop=True   seeded per step, resumable; no colour changes
      (crop_area, crop_aspect_ratio: the ranges the crops are drawn from)
  --config.label_smoothing=0.1                          smoothed targets in the training loss
  --config.ema_decay=0.999                              validation, best/, eval and the logits use a
                                                        moving average of the params
  --config.eval_flip_average=True                       logits averaged over each photo and its mirror
  --config.model.kind=clip --config.init_from=workdir:clip_pretrain/export
                                                        the clip_pretrain stage's tower + a linear head
A long schedule is `--config.num_epochs=N`: the optimizer's warm-up and cosine decay span all N
epochs, and validation (log.jsonl, best/) runs every `eval_every_epochs`.
Option `,paper`: ResNet-152 fine-tuned from `microsoft/resnet-152` (or `--config.init_from=DIR`) at
224 px with ImageNet normalisation.
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, (common.PAPER,))
  config = common.base_config("image", variant)
  config.init_from = ml_collections.config_dict.placeholder(str)
  # kind: "resnet" (depth, width, small_stem) or "clip" (the CLIP vision tower of `clip`, sized
  # like the variant's clip_pretrain tower, with a linear head).
  config.model = ml_collections.ConfigDict(dict(
      kind="resnet", depth=18, width=8, small_stem=True, clip=common.clip_tower(variant)))
  # Normalisation; None: the tower's own (ImageNet's for the ResNet, CLIP's for the CLIP tower).
  config.data.image_mean = ml_collections.config_dict.placeholder(tuple)
  config.data.image_std = ml_collections.config_dict.placeholder(tuple)
  # Training-photo augmentation, seeded per step (a resumed run sees the same photos); no colour
  # changes, since a product's colour often tells its class.
  config.random_flip = False  # Mirror left-right at random.
  config.random_crop = False  # Random-resized crops, resized back to data.image_size.
  config.crop_area = (0.35, 1.0)  # Fraction of the photo a crop covers, drawn uniformly.
  config.crop_aspect_ratio = (3 / 4, 4 / 3)  # Width / height of a crop, drawn log-uniformly.
  config.label_smoothing = 0.0  # Target (1 - a) one-hot + a / C in the training loss; 0: off.
  # Moving average of the params (and BatchNorm statistics), debiased, updated every step; when
  # > 0 it is what validation, best/, eval mode and the written logits use. 0: off.
  config.ema_decay = 0.0
  config.eval_flip_average = False  # Logits of validation/test: mean over the photo and its mirror.
  if variant in common.FASHION:  # The standard stem: 16x16 maps after it at 64 px, cheap on a CPU.
    config.model.update(width=32, small_stem=False)
  elif variant == "taimd17k":
    config.model.update(depth=50, width=64, small_stem=False)
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=2e-3, weight_decay=0.05, warmup_fraction=0.05, schedule="cosine",
      grad_clip_norm=1.0))
  config.batch_size = 64
  config.num_epochs = 8
  if variant in common.FASHION:
    # 12 epochs with flips, smoothing and flip-averaged evaluation: test macro F1 0.875 / 0.879 (two
    # seeds) on article_type against 0.832 for 2 plain epochs; crops of 70-100% cost 0.01-0.02, and
    # an EMA of 0.999 cost 0.005 on test at the end of the cosine schedule (scripts/eval_options.py);
    # smoothing adds 0.011 on validation, nothing on test; 30-32 min alone on 2 CPU cores
    # (docs/RESULTS.md, "A stronger image learner").
    config.batch_size = 128
    config.num_epochs = 12
    config.update(random_flip=True, label_smoothing=0.1, eval_flip_average=True)
  if variant == "toyshop":
    config.eval_every_epochs = config.checkpoint_every_epochs = 4
  if common.PAPER in options:
    config.init_from = common.PAPER_IMAGE_CHECKPOINT
    config.model.update(depth=152, width=64, small_stem=False)  # What the checkpoint holds.
    config.data.image_size = 224
    # Fine-tuning an ImageNet ResNet: the usual recipe (the paper's Table I values for it are not
    # given here).
    config.optimizer.update(learning_rate=1e-4, weight_decay=0.01, warmup_fraction=0.05)
    config.batch_size = 32
    config.num_epochs = 5
  return config
