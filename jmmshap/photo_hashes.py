"""The sha256 of every photo of a catalogue, kept between runs so that an unchanged catalogue costs
one `stat` per photo instead of reading every byte.

A digest is reused only while the file's (path, size, mtime_ns, ctime_ns, inode, device) are what
they were when it was hashed. `ctime` is the guard that matters: the kernel sets it on every write,
rename and metadata change and no user call can set it back, so a same-size rewrite, a photo
restored from a backup with its old mtime (`cp -p`, `touch -r`) and a photo replaced by another file
or by a symlink (the row then resolves to another path or inode) are all hashed again. A file
changed within `RACY_WINDOW_NS` of its hashing could share its old timestamps (file times tick
coarsely), so such an entry is never trusted and is hashed again on the next run.

The cache is an SQLite file per host (`cache_path`), safe for processes of one host running at
once. Entries are keyed by the resolved absolute path: a catalogue copied or moved elsewhere is
hashed again once, under its new paths.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import socket
import sqlite3
import time
from collections.abc import Sequence

RACY_WINDOW_NS = 2_000_000_000  # Covers coarse file clocks (ext4's jiffy to FAT's 2 s).
_HASH_THREADS = min(32, 2 * (os.cpu_count() or 1))  # hashlib and file reads release the GIL.
_SCHEMA = """CREATE TABLE IF NOT EXISTS photos (
  path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
  device INTEGER, hashed_ns INTEGER, sha256 TEXT) WITHOUT ROWID"""
MISSING = "missing"  # The digest of a path that is not a readable file.

Key = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device.


def default_cache_path(folder: str) -> str:
  """One cache file per host in `folder`: hosts sharing a data folder never lock each other's."""
  return os.path.join(folder, "photo_hashes", f"{socket.gethostname()}.sqlite3")


def _key(path: str) -> Key | None:
  try:
    status = os.stat(path)
  except OSError:
    return None
  return (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino, status.st_dev)


def _hash(path: str) -> tuple[str, Key | None, int]:
  """(hex digest or MISSING, the key it holds for, when hashing began); the key is None when the
  file changed while it was read, so that the digest is not cached."""
  started = time.time_ns()
  before = _key(path)
  try:
    with open(path, "rb") as photo:
      digest = hashlib.sha256(photo.read()).hexdigest()
  except OSError:
    return MISSING, None, started
  return digest, before if _key(path) == before else None, started


def _hash_all(paths: Sequence[str]) -> list[tuple[str, Key | None, int]]:
  return [_hash(path) for path in paths]


def _trusted(key: Key, hashed_ns: int) -> bool:
  """Whether the file's timestamps were set clearly before it was hashed (not racily clean)."""
  _, mtime_ns, ctime_ns, _, _ = key
  return max(mtime_ns, ctime_ns) < hashed_ns - RACY_WINDOW_NS


def _cached(database: sqlite3.Connection, paths: Sequence[str]):
  """(index in `paths`, key, hashed_ns, digest) of the paths with an entry: one ordered scan of the
  paths' range of the table merged with the sorted paths (a query per path costs 10x more)."""
  names = [os.fsencode(path) for path in paths]
  order = sorted(range(len(paths)), key=names.__getitem__)
  rows = database.execute(
      "SELECT path, size, mtime_ns, ctime_ns, inode, device, hashed_ns, sha256 FROM photos "
      "WHERE path BETWEEN ? AND ? ORDER BY path", (names[order[0]], names[order[-1]]))
  position = 0
  for path, *key, hashed_ns, sha256 in rows:
    while position < len(order) and names[order[position]] < path:
      position += 1
    while position < len(order) and names[order[position]] == path:  # Each row naming it.
      yield order[position], tuple(key), hashed_ns, sha256
      position += 1


@contextlib.contextmanager
def _database(cache_path: str):
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  connection = sqlite3.connect(cache_path, timeout=600)
  try:
    connection.execute(_SCHEMA)
    yield connection
  finally:
    connection.close()


def digests(paths: Sequence[str], cache_path: str | None) -> list[str]:
  """The sha256 hex digest of each file (MISSING for one that cannot be read), in `paths` order.

  With a cache, a file whose key matches its trusted entry is not opened; the others are read on
  several threads and their entries written back. Without one (None), every file is read.
  """
  keys = [_key(path) for path in paths]
  found: list[str | None] = [MISSING if key is None else None for key in keys]
  if cache_path is not None and paths:
    with _database(cache_path) as database:
      for i, key, hashed_ns, sha256 in _cached(database, paths):
        if key == keys[i] and _trusted(key, hashed_ns):
          found[i] = sha256
  todo = [i for i, digest in enumerate(found) if digest is None]
  if not todo:
    return found
  blocks = [[paths[i] for i in todo[start:start + 256]] for start in range(0, len(todo), 256)]
  with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:  # A task per block, not file.
    hashed = [result for block in pool.map(_hash_all, blocks) for result in block]
  entries = []
  for i, (digest, key, started) in zip(todo, hashed):
    found[i] = digest
    if key is not None:
      entries.append((os.fsencode(paths[i]), *key, started, digest))
  if cache_path is not None and entries:
    with _database(cache_path) as database, database:
      database.executemany("INSERT OR REPLACE INTO photos VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entries)
  return found
