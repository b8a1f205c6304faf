"""The photo hash cache: an unchanged photo is not read again, and every way of changing one is
caught (same-size rewrite, a restore with the old mtime, a symlink in its place)."""

import os
import shutil
import time

import pytest

from jmmshap import catalog, photo_hashes


@pytest.fixture
def trust_at_once(monkeypatch):
  """Entries are trusted as soon as they are written: a test's files are all just written."""
  monkeypatch.setattr(photo_hashes, "RACY_WINDOW_NS", 0)


def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _photos(folder, count: int = 3) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  return [_write(folder / f"p{i}.jpg", bytes([i]) * 100) for i in range(count)]


def _after_a_clock_tick():
  """File times tick coarsely (a few ms); a change right after the hash could share its time."""
  time.sleep(0.05)


def test_unchanged_photos_cost_a_stat_and_are_not_opened(tmp_path, trust_at_once, opened_files):
  paths = _photos(tmp_path / "images")
  cache = str(tmp_path / "cache.sqlite3")
  first = photo_hashes.digests(paths, cache)
  assert set(paths) <= set(opened_files)
  opened_files.clear()
  assert photo_hashes.digests(paths, cache) == first
  assert not set(paths) & set(opened_files)
  assert photo_hashes.digests(paths, None) == first  # The cache gives what reading gives.


def test_a_same_size_rewrite_is_hashed_again(tmp_path, trust_at_once):
  paths = _photos(tmp_path / "images")
  cache = str(tmp_path / "cache.sqlite3")
  first = photo_hashes.digests(paths, cache)
  before = os.stat(paths[1])
  _after_a_clock_tick()
  _write(paths[1], b"\xff" * 100)
  os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))  # Even with its old mtime.
  assert os.stat(paths[1]).st_size == before.st_size
  second = photo_hashes.digests(paths, cache)
  assert second[1] != first[1] and second[0] == first[0] and second[2] == first[2]


@pytest.mark.parametrize("restore", ["cp -p", "touch -r"])
def test_a_photo_restored_from_a_backup_with_its_old_mtime_is_hashed_again(tmp_path, trust_at_once,
                                                                           restore):
  paths = _photos(tmp_path / "images")
  backup = _write(tmp_path / "backup.jpg", b"\x07" * 100)
  cache = str(tmp_path / "cache.sqlite3")
  photo_hashes.digests(paths, cache)
  old = os.stat(paths[0])
  os.utime(backup, ns=(old.st_atime_ns, old.st_mtime_ns))
  _after_a_clock_tick()
  if restore == "cp -p":
    shutil.copy2(backup, paths[0])  # New bytes, and the backup's (the old) mtime.
  else:
    _write(paths[0], b"\x07" * 100)
    shutil.copystat(backup, paths[0])
  assert os.stat(paths[0]).st_mtime_ns == old.st_mtime_ns
  assert photo_hashes.digests(paths, cache)[0] == photo_hashes.digests([backup], None)[0]


def test_a_photo_replaced_by_a_symlink_changes_the_fingerprint(tmp_path, trust_at_once):
  images = tmp_path / "images"
  paths = _photos(images)
  cache = str(tmp_path / "cache.sqlite3")
  rows = lambda: [catalog.Row(i, f"p{i}", "t", "l", "train",
                              catalog.contained(os.path.realpath(images), f"p{i}.jpg"))
                  for i in range(len(paths))]
  first = catalog.images_fingerprint(str(images), rows(), cache)
  assert catalog.images_fingerprint(str(images), rows(), cache) == first
  _after_a_clock_tick()
  os.remove(paths[0])
  os.symlink("p2.jpg", paths[0])
  assert catalog.images_fingerprint(str(images), rows(), cache) != first


def test_a_photo_hashed_within_the_racy_window_is_read_again(tmp_path, opened_files):
  paths = _photos(tmp_path / "images")  # Just written: within RACY_WINDOW_NS of any hash now.
  cache = str(tmp_path / "cache.sqlite3")
  photo_hashes.digests(paths, cache)
  opened_files.clear()
  photo_hashes.digests(paths, cache)
  assert set(paths) <= set(opened_files)


def test_a_missing_photo_has_its_own_digest_and_one_that_appears_later_is_read(tmp_path, trust_at_once):
  paths = _photos(tmp_path / "images", 2)
  os.remove(paths[1])
  cache = str(tmp_path / "cache.sqlite3")
  assert photo_hashes.digests(paths, cache)[1] == photo_hashes.MISSING
  _write(paths[1], b"\x01" * 100)
  assert photo_hashes.digests(paths, cache)[1] != photo_hashes.MISSING
