"""Title tokenisation with Hugging Face `tokenizers`: a checkpoint's own WordPiece, or one trained here.

Without a pretrained text model there is no vocabulary to reuse, so a BERT-style WordPiece vocabulary is
trained on the training titles and saved next to the checkpoints (the eval mode and later stages reload
it, so ids never drift between runs).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.implementations import BertWordPieceTokenizer

from jmmshap import errors
from jmmshap.models import hf

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


class TokenizerNotFound(FileNotFoundError, errors.UserError):
  """A checkpoint folder named as a tokenizer holds none."""


class TitleTokenizer:
  """Fixed-length BERT inputs for a batch of titles, plus word ids to group tokens into players."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int):
    if max_length < 3:
      raise ValueError(f"max_length={max_length}: need room for [CLS], one token and [SEP]")
    self.tokenizer = tokenizer
    self.max_length = max_length
    for token in SPECIAL_TOKENS:
      if tokenizer.token_to_id(token) is None:
        raise ValueError(f"the tokenizer has no {token} token; a BERT WordPiece vocabulary is expected")
    self.pad_id = tokenizer.token_to_id("[PAD]")
    self.cls_id = tokenizer.token_to_id("[CLS]")
    self.sep_id = tokenizer.token_to_id("[SEP]")
    self.mask_id = tokenizer.token_to_id("[MASK]")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  @classmethod
  def train(cls, titles: Iterable[str], *, vocab_size: int, max_length: int,
            lowercase: bool = True) -> TitleTokenizer:
    """A WordPiece vocabulary from the training titles only (never from evaluation data).

    Built here rather than by `tokenizers`' WordPieceTrainer, which breaks frequency ties in hash order:
    two trainings on the same titles gave vocabularies with 57 of 319 ids apart, and so different
    models. This one is deterministic: the special tokens, every character as a word start and as a
    continuation (`##c`), then whole words by descending count (ties alphabetical) up to `vocab_size`;
    a rarer word is split by WordPiece's longest match into the pieces the vocabulary has.
    """
    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(
        word for title in titles
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(title)))
    characters = sorted({character for word in counts for character in word})
    vocab = dict.fromkeys([*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)])
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
      if len(vocab) >= vocab_size:
        break
      vocab.setdefault(word)
    tokenizer = tokenizers.Tokenizer(models.WordPiece(
        {token: index for index, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return cls(tokenizer, max_length)

  @classmethod
  def from_folder(cls, path: str, *, max_length: int) -> TitleTokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json, else vocab.txt (+ tokenizer_config.json)."""
    path = hf.resolve_path(path)
    json_file = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(json_file):
      return cls(tokenizers.Tokenizer.from_file(json_file), max_length)
    vocab_file = os.path.join(path, "vocab.txt")
    if not os.path.isfile(vocab_file):
      raise TokenizerNotFound(
          f"{path}: no tokenizer.json or vocab.txt; point data.tokenizer at a checkpoint folder that has "
          "one, or leave it empty to train a WordPiece vocabulary on the training titles.")
    lowercase = True
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
      with open(config_file) as f:
        lowercase = bool(json.load(f).get("do_lower_case", True))
    wordpiece = BertWordPieceTokenizer(vocab_file, lowercase=lowercase, strip_accents=lowercase)
    return cls(wordpiece._tokenizer, max_length)  # pylint: disable=protected-access

  def save(self, path: str) -> None:
    self.tokenizer.save(path)

  def __call__(self, titles: Sequence[str]) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids and word_ids (-1 on [CLS]/[SEP]/[PAD]), all (B, L)."""
    encodings = self.tokenizer.encode_batch(list(titles))
    batch, length = len(encodings), self.max_length
    input_ids = np.full((batch, length), self.pad_id, np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    word_ids = np.full((batch, length), -1, np.int32)
    for row, encoding in enumerate(encodings):
      ids = encoding.ids
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
      word_ids[row, :len(ids)] = [-1 if w is None or s else w
                                  for w, s in zip(encoding.word_ids, encoding.special_tokens_mask)]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": np.zeros((batch, length), np.int32), "word_ids": word_ids}
