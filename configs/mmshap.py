r"""MM-SHAP of the trained CLIP-MMBT: text and image shares of its predictions on validation and test.

  python train.py --config=configs/mmshap.py --workdir=W             # after configs/mmbt.py into W
  python train.py --config=configs/mmshap.py:fashion --workdir=W --config.max_examples=200

Variants (toyshop, fashion, taimd17k) must name the MMBT's. The data, tokenizer and masking come from
the MMBT saved in W/mmbt, so nothing about them is repeated here: `data.data_dir` and
`data.manual_dir` only say where that data lives now (None: where the MMBT read it), and
`text_masking` / `image_masking` (None: as the MMBT was trained; see jmmshap/models/mmbt.py) switch
how a masked title token ('mask_token' or 'attention') or image embedding ('zero' or 'attention') is
represented.

Image players: `embeddings` (the default) for the ensemble's weighting; `--config.image_players=patches
--config.patch_grid=2` for per-product explanations and numbers comparable with the published MM-SHAP
(docs/RESULTS.md, "Image players": same dataset share on fashion, 7x the cost of embeddings).
"""

import ml_collections

from configs import common


def get_config(arg: str = "toyshop") -> ml_collections.ConfigDict:
  variant, options = common.parse_arg(arg, (common.PAPER,))
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.stage = "mmshap"
  config.variant = variant
  config.seed = 0  # KernelSHAP draws for example i of a split use the key (seed, i).
  config.data = ml_collections.ConfigDict(dict(data_dir=placeholder(str),
                                                manual_dir=placeholder(str),
                                                worker_count=placeholder(int),
                                                prepare_workers=placeholder(int)))
  config.splits = ("validation", "test")
  config.max_examples = 0  # Per split; 0: all.

  # The game: the explained class ('predicted' on the full input, 'label', or a class name) and its
  # value: the logit ('logit', as in the MM-SHAP paper), the log-probability ('log_prob'), the
  # log-odds ('log_odds': the logit minus the logsumexp of the other logits), or 'contrast': the
  # logit minus the other logits weighted by the full input's probabilities of them, which credits
  # what separates the class from the rivals the model weighed (jmmshap.mmshap.contrast_weights).
  config.target = "predicted"
  config.value = "logit"
  # Text players: 'words', or runs of `tokens_per_player` tokens ('tokens'). Titles with more than
  # max_text_players (0: no limit) merge their trailing words into the last text player.
  config.text_players = "words"
  config.tokens_per_player = 1
  config.max_text_players = 0
  config.text_masking = placeholder(str)
  # 'embeddings': the MMBT's N image embeddings are the image players (its vision tower runs once
  # per example); 'patches': a grid of pixel patches, as MM-SHAP's authors define it (the whole model
  # runs per coalition). patch_grid: patches a side, 0: the authors' rule (about as many image
  # players as text tokens); patch_fill: a masked patch's pixels in the model's input space.
  config.image_players = "embeddings"
  config.patch_grid = 0
  config.patch_fill = 0.0
  config.image_masking = placeholder(str)

  # Exact Shapley values up to max_exact_players players (text + image), KernelSHAP above with
  # `budget` evaluations per example (0: 2 p + 2048). method: 'auto', 'exact' (at most 24 players),
  # 'kernel' or 'permutation'.
  config.method = "auto"
  config.max_exact_players = 16
  config.budget = 0
  # Coalition rows per forward call (bounds memory; a multiple of the device count) and examples
  # whose coalitions are packed into the same calls.
  config.chunk_size = 0  # The most rows per call; 0: the backend's measured default (jmmshap/mmshap.py).
  config.memory_gb = 0.0  # Activation memory a call may take; 0: half the GPUs', a quarter of the host's.
  config.examples_per_group = 16
  if common.PAPER in options:
    # 120-token titles: at most 12 word players (the rest merged into the last) + 4 image players,
    # exact (2**16 coalitions per example).
    config.max_text_players = 12
  return config
