"""Output files written a chunk at a time, so that memory holds one chunk whatever the row count:
a CSV whose rows are appended, and an npz whose arrays grow along their first axis.

Each file appears under its name only once whole (a rename, as `workdir.write_atomically`): a run
killed midway leaves no half file under the final name. `NpzStream` keeps each array's chunks in a
file of its own beside the target; `close` writes every array as one .npy member of the npz (the
header with the final shape and dtype, then the chunks one by one), which `np.load` reads as the
npz that `np.savez` of the whole arrays writes.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jmmshap import workdir


class CsvStream:
  """A CSV written row by row into its partial file, renamed over `target` by `close`."""

  def __init__(self, target: str, header: Sequence[str]):
    self.target, self.partial = target, workdir.partial_path(target)
    self.rows = 0
    self._file = open(self.partial, "w", newline="", encoding="utf-8")
    self._writer = csv.writer(self._file, lineterminator="\n")
    self._writer.writerow(header)

  def write(self, rows: Iterable[Sequence[Any]]) -> None:
    for row in rows:
      self._writer.writerow(row)
      self.rows += 1

  def close(self) -> None:
    self._file.close()
    os.replace(self.partial, self.target)

  def abort(self) -> None:
    """Drops what was written: nothing appears under `target`."""
    self._file.close()
    if os.path.exists(self.partial):
      os.remove(self.partial)


class NpzStream:
  """An npz whose arrays arrive in chunks of rows (first axis); `constant` arrays (the same in
  every chunk, e.g. class names) are stored once. Memory: one chunk of one array at a time."""

  def __init__(self, target: str, constant: Sequence[str] = ()):
    self.target, self.constant = target, tuple(constant)
    self.folder = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-{os.getpid()}-",
                                   dir=os.path.dirname(os.path.abspath(target)))
    self.keys: list[str] | None = None
    self.constants: dict[str, np.ndarray] = {}
    self.pieces: dict[str, list[tuple[np.dtype, tuple[int, ...]]]] = {}

  def _piece_file(self, key: str) -> str:
    assert self.keys is not None
    return os.path.join(self.folder, f"{self.keys.index(key)}.raw")

  def append(self, arrays: Mapping[str, Any]) -> None:
    """One chunk: every array of the npz, the same keys each time."""
    if self.keys is None:
      self.keys = list(arrays)
    elif list(arrays) != self.keys:
      raise ValueError(f"{self.target}: a chunk has the arrays {sorted(arrays)}, the first had "
                       f"{sorted(self.keys)}; every chunk must have the same.")
    for key, value in arrays.items():
      value = np.asarray(value)
      if key in self.constant:
        if key not in self.constants:
          self.constants[key] = value
        elif not np.array_equal(self.constants[key], value):
          raise ValueError(f"{self.target}: {key!r} differs between chunks; it is stored once.")
        continue
      if value.dtype.hasobject or value.ndim == 0:
        raise ValueError(f"{self.target}: {key!r} is {value.dtype} {value.shape}; a streamed "
                         "array needs a plain dtype and a first axis of rows.")
      pieces = self.pieces.setdefault(key, [])
      if pieces and pieces[0][1][1:] != value.shape[1:]:
        raise ValueError(f"{self.target}: {key!r} has rows of shape {value.shape[1:]} in this "
                         f"chunk and {pieces[0][1][1:]} in the first; they must be the same.")
      with open(self._piece_file(key), "ab") as f:
        f.write(np.ascontiguousarray(value).tobytes())
      pieces.append((value.dtype, value.shape))

  def _write_member(self, archive: zipfile.ZipFile, key: str) -> None:
    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
      if key in self.constants:
        np.lib.format.write_array(member, self.constants[key], allow_pickle=False)
        return
      pieces = self.pieces[key]
      dtype = np.result_type(*(piece_dtype for piece_dtype, _ in pieces))  # Strings: the widest.
      shape = (sum(piece_shape[0] for _, piece_shape in pieces), *pieces[0][1][1:])
      header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": shape}
      np.lib.format.write_array_header_1_0(member, header)
      with open(self._piece_file(key), "rb") as source:
        for piece_dtype, piece_shape in pieces:
          size = int(np.prod(piece_shape)) * piece_dtype.itemsize
          piece = np.frombuffer(source.read(size), piece_dtype).reshape(piece_shape)
          member.write(piece.astype(dtype, copy=False).tobytes())

  def close(self) -> None:
    """Writes the npz and renames it over `target`."""
    if self.keys is None:
      raise ValueError(f"{self.target}: no chunk was appended.")
    partial = workdir.partial_path(self.target)
    try:
      with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key in self.keys:
          self._write_member(archive, key)
      os.replace(partial, self.target)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
      shutil.rmtree(self.folder, ignore_errors=True)

  def abort(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)
