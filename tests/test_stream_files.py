"""Files written a chunk at a time: the npz loads as np.savez of the whole arrays wrote it, and
nothing appears under the target's name before `close`."""

import os

import numpy as np
import pytest

from jmmshap import stream_files


def _chunks():
  """Three chunks of rows (the last short), with strings that grow wider from chunk to chunk."""
  rng = np.random.default_rng(0)
  sizes = (4, 4, 3)
  ids = [np.asarray([f"{'x' * (2 * chunk + 1)}{row}" for row in range(size)])
         for chunk, size in enumerate(sizes)]
  return [{"ids": ids[chunk], "phi": rng.normal(size=(size, 5)),
           "exact": rng.random(size) > 0.5, "targets": rng.integers(0, 9, size).astype(np.int32),
           "class_names": np.asarray(["a", "bb", "ccc"])}
          for chunk, size in enumerate(sizes)]


def test_an_npz_streamed_in_chunks_loads_as_the_whole_arrays_saved_at_once(tmp_path):
  chunks = _chunks()
  stream = stream_files.NpzStream(str(tmp_path / "streamed.npz"), constant=("class_names",))
  for chunk in chunks:
    stream.append(chunk)
  assert not (tmp_path / "streamed.npz").exists()  # Only whole, at close.
  stream.close()
  whole = {key: chunks[0][key] if key == "class_names" else np.concatenate([c[key] for c in chunks])
           for key in chunks[0]}
  np.savez(tmp_path / "whole.npz", **whole)
  with np.load(tmp_path / "streamed.npz") as streamed, np.load(tmp_path / "whole.npz") as saved:
    assert streamed.files == saved.files
    for key in saved.files:
      assert streamed[key].dtype == saved[key].dtype, key  # The widest string of any chunk.
      np.testing.assert_array_equal(streamed[key], saved[key], err_msg=key)
  assert sorted(os.listdir(tmp_path)) == ["streamed.npz", "whole.npz"]  # No leftover pieces.


def test_chunks_that_do_not_fit_together_are_refused_by_name(tmp_path):
  first, second, _ = _chunks()
  stream = stream_files.NpzStream(str(tmp_path / "a.npz"), constant=("class_names",))
  stream.append(first)
  with pytest.raises(ValueError, match=r"'phi' has rows of shape \(6,\) in this chunk and \(5,\)"):
    stream.append({**second, "phi": np.zeros((4, 6))})
  with pytest.raises(ValueError, match=r"'class_names' differs between chunks"):
    stream.append({**second, "class_names": np.asarray(["z"])})
  with pytest.raises(ValueError, match=r"every chunk must have the same"):
    stream.append({key: value for key, value in second.items() if key != "exact"})
  stream.abort()
  assert os.listdir(tmp_path) == []


def test_an_aborted_csv_leaves_nothing_and_a_closed_one_its_rows(tmp_path):
  aborted = stream_files.CsvStream(str(tmp_path / "aborted.csv"), ["id", "p"])
  aborted.write([["a", "0.5"]])
  aborted.abort()
  assert os.listdir(tmp_path) == []
  stream = stream_files.CsvStream(str(tmp_path / "rows.csv"), ["id", "p"])
  stream.write([["a", "0.5"]])
  stream.write([["b,c", "1"]])
  assert not (tmp_path / "rows.csv").exists()
  stream.close()
  assert (tmp_path / "rows.csv").read_text() == 'id,p\na,0.5\n"b,c",1\n'
