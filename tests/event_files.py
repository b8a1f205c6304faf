"""Reads TensorBoard event files back for the tests (not a test module itself), independently of the
package's writer: the TFRecord framing (8-byte length, its masked CRC-32C, the data, its masked
CRC-32C) checked record by record, and the events parsed with tensorboardX's protobuf definitions."""

import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data) & 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def paths(directory: str) -> list[str]:
  """The files TensorBoard reads as the folder's run (their names contain "tfevents")."""
  return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                if "tfevents" in name)


def read(path: str) -> list[event_pb2.Event]:
  with open(path, "rb") as f:
    data = f.read()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    body = data[offset + 12:offset + 12 + length]
    (body_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert header_crc == _masked_crc(header) and body_crc == _masked_crc(body), (path, offset)
    events.append(event_pb2.Event.FromString(body))
    offset += 16 + length
  return events


def only(directory: str) -> list[event_pb2.Event]:
  """The events of the folder's one event file (fails if there is none or several)."""
  found = paths(directory)
  assert len(found) == 1, found
  return read(found[0])


def _values(events: Iterable[event_pb2.Event], kind: str) -> dict[tuple[str, int], list]:
  """(tag, step) -> every summary value of `kind` ("simple_value", "histo") written for it (a list,
  so that a duplicate shows)."""
  found: dict[tuple[str, int], list] = {}
  for event in events:
    for value in event.summary.value:
      if value.WhichOneof("value") == kind:
        found.setdefault((value.tag, event.step), []).append(getattr(value, kind))
  return found


def scalars(events: Iterable[event_pb2.Event]) -> dict[tuple[str, int], list[float]]:
  """(tag, step) -> every scalar written for it."""
  return _values(events, "simple_value")


def histograms(events: Iterable[event_pb2.Event]) -> dict[tuple[str, int], list[Any]]:
  """(tag, step) -> every HistogramProto written for it."""
  return _values(events, "histo")


def logged(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[float]]:
  """What `scalars` should read for log.jsonl's records: each number (None left out) under
  `{split}/{name}` at the record's step, as float32 (how an event stores a scalar)."""
  expected: dict[tuple[str, int], list[float]] = {}
  for record in records:
    for name, value in record.items():
      if name not in ("split", "step") and value is not None:
        expected.setdefault((f"{record['split']}/{name}", record["step"]), []).append(
            float(np.float32(value)))
  return expected
