"""The pipeline's stages and how `train.py` dispatches to them by `config.stage`."""

from __future__ import annotations

import ml_collections
from absl import logging
from flax import nnx

from jmmshap import train_lib
from jmmshap.tokenizer import TitleTokenizer


def build_text_model(config: ml_collections.ConfigDict, num_classes: int,
                     tokenizer: TitleTokenizer | None) -> nnx.Module:
  """BERT for sequence classification: from `init_from` (a HF BERT folder) or from scratch."""
  from jmmshap.models import bert  # pylint: disable=g-import-not-at-top
  rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
  if config.get("init_from"):
    model, _ = bert.from_pretrained(config.init_from, bert.hf.read_config(config.init_from),
                                    num_labels=num_classes, rngs=rngs)
    return model
  bert_config = bert.BertConfig(vocab_size=tokenizer.vocab_size,
                                max_position_embeddings=config.data.max_length,
                                pad_token_id=tokenizer.pad_id, **config.model.to_dict())
  logging.info("text model: %s", bert_config)
  return bert.BertForSequenceClassification(bert_config, num_labels=num_classes, rngs=rngs)


TEXT = train_lib.ClassifierStage(
    name="text", inputs=("input_ids", "attention_mask", "token_type_ids"),
    build_model=build_text_model, uses_text=True, uses_image=False)

CLASSIFIERS = {stage.name: stage for stage in (TEXT,)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.stage in CLASSIFIERS:
    return train_lib.train_and_evaluate(config, workdir, CLASSIFIERS[config.stage])
  raise ValueError(f"config.stage={config.stage!r}: known stages are {sorted(CLASSIFIERS)}")
