import numpy as np
import pytest

from jmmshap.tokenizer import TitleTokenizer

TITLES = ["Puma Men Grey T-shirt", "Nike Women Running Shoes", "Red ceramic mug",
          "Blue cotton cap", "Titan Men Silver Watch"] * 20


def test_trained_tokenizer_pads_truncates_and_marks_words():
  tokenizer = TitleTokenizer.train(TITLES, vocab_size=300, max_length=8)
  batch = tokenizer(["Red ceramic mug", "Nike Women Running Shoes Red ceramic mug extra words"])
  assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == np.int32
  assert batch["input_ids"][0, 0] == tokenizer.cls_id
  length = batch["attention_mask"][0].sum()
  assert batch["input_ids"][0, length - 1] == tokenizer.sep_id
  assert np.all(batch["input_ids"][0, length:] == tokenizer.pad_id)
  # Truncated row: full, still closed by [SEP].
  assert batch["attention_mask"][1].sum() == 8 and batch["input_ids"][1, -1] == tokenizer.sep_id
  # Words of the first title: 0, 1, 2 in order, specials and padding -1.
  words = batch["word_ids"][0]
  assert words[0] == -1 and words[length - 1] == -1 and np.all(words[length:] == -1)
  assert list(dict.fromkeys(words[1:length - 1])) == [0, 1, 2]


def test_tokenizer_round_trips_through_its_file(tmp_path):
  tokenizer = TitleTokenizer.train(TITLES, vocab_size=300, max_length=10)
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  reloaded = TitleTokenizer.from_folder(str(tmp_path), max_length=10)
  for key, value in tokenizer(TITLES[:5]).items():
    np.testing.assert_array_equal(reloaded(TITLES[:5])[key], value)


def test_vocab_txt_folder_uses_bert_wordpiece(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "mug", "cap", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = TitleTokenizer.from_folder(str(tmp_path), max_length=6)
  batch = tokenizer(["Red mugs"])
  np.testing.assert_array_equal(batch["input_ids"][0], [2, 5, 6, 8, 3, 0])
  np.testing.assert_array_equal(batch["word_ids"][0], [-1, 0, 1, 1, -1, -1])


def test_folder_without_vocabulary_explains_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
    TitleTokenizer.from_folder(str(tmp_path), max_length=8)


def test_training_is_deterministic_and_keeps_frequent_words_whole():
  first = TitleTokenizer.train(TITLES, vocab_size=60, max_length=10)
  again = TitleTokenizer.train(TITLES[::-1], vocab_size=60, max_length=10)
  assert first.tokenizer.get_vocab() == again.tokenizer.get_vocab()
  vocab = first.tokenizer.get_vocab()
  assert len(vocab) == 60 and {"men", "mug", "red"} <= set(vocab)  # "men" is the most frequent.
  # A word the vocabulary lacks is spelled out in known pieces, never lost to [UNK].
  batch = first(["grain"])
  pieces = batch["input_ids"][0, 1:batch["attention_mask"][0].sum() - 1]
  assert len(pieces) > 1 and first.tokenizer.token_to_id("[UNK]") not in pieces
