r"""Image learner: a ResNet classifier on the product photo.

Variants: toyshop (default; a narrow ResNet-18 with a small-image stem, seconds on a CPU), fashion,
taimd17k. Depth 18/34/50/101/152 is `--config.model.depth`; `--config.model.width=64` gives the
standard widths (ResNet-152: `--config.model.depth=152 --config.model.width=64`), and
`--config.init_from=DIR` starts from a HF ResNet folder or a torchvision state-dict file.
`--config.random_flip=True` mirrors training photos left-right at random (seeded per step).
Option `,paper`: ResNet-152 fine-tuned from `microsoft/resnet-152` (or `--config.init_from=DIR`) at
224 px with ImageNet normalisation.
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, (common.PAPER,))
  config = common.base_config("image", variant)
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.model = ml_collections.ConfigDict(dict(depth=18, width=8, small_stem=True))
  config.random_flip = False  # Mirror training photos left-right at random (seeded, resumable).
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
    config.batch_size = 128
    config.num_epochs = 2
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
