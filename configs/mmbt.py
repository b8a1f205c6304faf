r"""CLIP-MMBT: a CLIP vision tower pooled into N image embeddings inside BERT's token sequence.

Variants: toyshop (default; tiny towers trained from scratch), fashion, taimd17k. Append ",paper" for
the paper's setting (BERT-base and CLIP ViT-B/32 sizes, 4 image embeddings, text length 120, images
288 px), from `bert-base-uncased` and `openai/clip-vit-base-patch32` (hub names or folders), e.g.
`--config=configs/mmbt.py:taimd17k,paper`. Towers start from checkpoints with
`--config.init_from_text=DIR` (HF BERT folder) and `--config.init_from_image=DIR` (HF CLIP folder);
`--config.model.image_tower=resnet` swaps CLIP for a ResNet, as in the original MMBT (with
`--config.init_from_image=workdir:image/export`, the image learner's trained ResNet). A path
`workdir:<path>` is relative to the run's workdir: the fashion variants start the vision tower from
`workdir:clip_pretrain/export`, the output of configs/clip_pretrain.py.
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, ("paper",))
  paper = "paper" in options
  config = common.base_config("mmbt", variant)
  config.data.max_length = 16 if variant == "toyshop" else 32
  config.data.vocab_size = 1000 if variant == "toyshop" else 8000
  config.data.tokenizer = ml_collections.config_dict.placeholder(str)
  # Normalisation; None: the tower's own (CLIP's for the CLIP tower, ImageNet's for the ResNet).
  config.data.image_mean = ml_collections.config_dict.placeholder(tuple)
  config.data.image_std = ml_collections.config_dict.placeholder(tuple)
  config.init_from_text = ml_collections.config_dict.placeholder(str)
  config.init_from_text_layers = 0  # Keep only the first layers of init_from_text (0: all).
  config.init_from_image = ml_collections.config_dict.placeholder(str)

  config.model = ml_collections.ConfigDict(dict(
      num_image_embeddings=4, image_tower="clip", text_masking="mask_token", image_masking="zero",
      classifier_dropout=0.1,
      bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
      clip=common.clip_tower(variant),
      resnet=dict(depth=18, width=16, small_stem=True)))
  if variant != "toyshop":
    config.model.bert.update(hidden_size=256, num_hidden_layers=4, intermediate_size=1024)
  if paper:
    config.data.max_length = 120
    config.data.image_size = 288
    config.model.bert.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)
    config.model.clip.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, patch_size=32)
    config.init_from_text = common.PAPER_TEXT_CHECKPOINT
    config.init_from_image = common.PAPER_CLIP_CHECKPOINT

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3 if variant == "toyshop" else 1e-4, weight_decay=0.01,
      warmup_fraction=0.1, schedule="cosine", grad_clip_norm=1.0))
  config.batch_size = 64
  config.num_epochs = 20 if variant == "toyshop" else 5
  if variant in common.FASHION and not paper:
    # Sized for a 2-core CPU: the first 2 layers of MiniLM, the tower pretrained by
    # configs/clip_pretrain.py in the same workdir, and 2 image embeddings, so that exact MM-SHAP
    # over the title and the 2 image embeddings needs 8 coalitions per example.
    config.data.max_length = 20  # 99% of the titles are 18 MiniLM tokens or fewer.
    config.data.tokenizer = common.MINILM
    config.init_from_text = common.MINILM
    config.init_from_text_layers = 2
    config.init_from_image = "workdir:clip_pretrain/export"
    config.model.num_image_embeddings = 2
    config.optimizer.learning_rate = 2e-4
    config.batch_size = 32
    config.num_epochs = 1
  if variant == "toyshop":
    config.eval_every_epochs = config.checkpoint_every_epochs = 5
  if paper:
    # Fine-tuning both pretrained towers: the usual recipe (the paper's Table I values for them are
    # not given here).
    config.optimizer.update(learning_rate=2e-5, warmup_fraction=0.1)
    config.batch_size = 32
    config.num_epochs = 5
  return config
