"""Token ids on disk: a raw little-endian array, read back as `np.memmap`.

A corpus of several GB then trains without being loaded: the sampler slices
windows out of the memory map and the OS pages in only what it touches.
The dtype is the smallest that holds the vocabulary (uint8 up to 256, uint16
up to 65,536 tokens, else uint32); its name and the token count live in the JSON beside
the file (`metadata.json` of a preprocessed book folder, or a cache record).
"""

from __future__ import annotations

import json
import os
import secrets

import numpy as np

from hope_jax.config import ConfigError


def dtype_for(vocab_size: int) -> np.dtype:
  if vocab_size <= 1 << 8:  # Byte-level ids: one byte per token.
    return np.dtype("u1")
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def temp_path(path: str) -> str:
  """A temporary name beside `path`, unique to this writer.

  Two runs may build the same cache at once; a shared name would let one
  truncate or rename away the other's half-written file.
  """
  return f"{path}.{os.getpid()}-{secrets.token_hex(4)}.partial"


def publish(tmp: str, path: str) -> None:
  """Atomically renames the finished `tmp` to `path`.

  A concurrent writer of the same deterministic content may have won the
  race; its file is as good as ours (and on Windows, where a mapped file
  cannot be replaced, it is the one to keep).
  """
  try:
    os.replace(tmp, path)
  except OSError:
    if not os.path.isfile(path):
      raise
    os.remove(tmp)


def write_json(path: str, obj: dict) -> None:
  """Writes `obj` as JSON to `path` atomically: readers see all of it or nothing.

  Text stays readable (no ASCII escapes), except that a file name which is not UTF-8 comes
  from os.listdir with lone surrogates, which UTF-8 cannot write: as backslash escapes they
  are JSON's own "\\udcXX", read back unchanged.
  """
  tmp = temp_path(path)
  try:
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
      json.dump(obj, f, ensure_ascii=False, indent=2)
    publish(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class TokenWriter:
  """Appends id arrays to `path`; the file appears only when `close()` succeeds."""

  def __init__(self, path: str, vocab_size: int):
    self.path, self.vocab_size = path, vocab_size
    self.dtype = dtype_for(vocab_size)
    self._tmp = temp_path(path)
    self._file = open(self._tmp, "wb")
    self.count = 0

  def write(self, ids: np.ndarray) -> int:
    """Appends `ids`; returns the offset (in tokens) where they start."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token id out of range [0, {self.vocab_size}) while writing {self.path}")
    offset = self.count
    self._file.write(ids.astype(self.dtype, copy=False).tobytes())
    self.count += int(ids.size)
    return offset

  def close(self) -> int:
    self._file.close()
    publish(self._tmp, self.path)
    return self.count

  def abort(self) -> None:
    self._file.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> "TokenWriter":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def open_tokens(path: str, dtype: str, count: int) -> np.ndarray:
  """Memory-maps `count` ids of `dtype` from `path`, read-only.

  Errors say what is wrong, not what to do: the caller knows what wrote the file.

  Raises:
    ConfigError: the dtype is not uint8/16/32, the count not an int >= 0, the
      file is missing, or its size does not match the record.
  """
  try:
    dt = np.dtype(dtype)
  except (TypeError, ValueError):  # Not a dtype at all ("foo"): as unsupported as float32.
    dt = None
  if dt not in (np.dtype("u1"), np.dtype("<u2"), np.dtype("<u4")):
    raise ConfigError(f"{path}: unsupported token dtype {dtype!r} (expected uint8/16/32)")
  if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
    raise ConfigError(f"{path}: its record's token count {count!r} is not an integer >= 0")
  if not os.path.isfile(path):
    raise ConfigError(f"token file {path} is missing")
  size = os.path.getsize(path)
  if size != count * dt.itemsize:
    raise ConfigError(
        f"token file {path} has {size} bytes but its record says {count} tokens of {dt.name} "
        f"({count * dt.itemsize} bytes); it is truncated or stale")
  if count == 0:
    return np.zeros((0,), dtype=dt)
  return np.memmap(path, dtype=dt, mode="r", shape=(count,))
