"""Plain text in any common encoding, and the TXT book reader.

Encoding: a byte-order mark wins; then UTF-16 without one (Latin-script text, told by
its NUL bytes); then strict UTF-8; then charset-normalizer's
best guess (GB18030, Big5, Shift-JIS, EUC-KR, Windows code pages, ...). Among
single-byte Latin-script code pages the guess is unreliable on short texts
(French comes back as Central European cp1250), so Windows-1252 (Western
European) is preferred whenever it decodes the bytes. Pages of other scripts
(Cyrillic, Greek, Hebrew, Arabic, ...) are kept: their bytes are letters that
cp1252 would turn into Latin mojibake.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from typing import Iterator

from hope_jax.data.readers.document import (
  BookSkipped,
  Chapter,
  Document,
  ReadOptions,
  clean_inline,
  lines_to_paragraphs,
)

SAMPLE_BYTES = 1 << 22  # Bytes looked at to detect the encoding of a large file.
BINARY_CHECK_BYTES = 1 << 16  # Head of a file searched for NUL characters.

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
# Latin-script single-byte code pages (canonical codec names), which charset-normalizer
# confuses with each other on Western European text; any other script is never replaced.
_LATIN_SINGLE_BYTE = frozenset(codecs.lookup(name).name for name in (
    "cp1250", "cp1252", "cp1254", "cp1257", "cp1258", "latin_1", "iso8859_2", "iso8859_3",
    "iso8859_4", "iso8859_9", "iso8859_10", "iso8859_13", "iso8859_14", "iso8859_15",
    "iso8859_16", "mac_roman", "mac_latin2", "mac_iceland", "mac_turkish", "mac_croatian",
    "mac_romanian", "cp437", "cp775", "cp850", "cp852", "cp857", "cp858", "cp860", "cp861",
    "cp863", "cp865", "hp_roman8"))

# A line that opens a chapter: "Chapter 12", "CHAPTER IV. The Sea", "Part two",
# "第十二章", "第3回" (Chinese and Japanese novels).
CHAPTER_LINE = re.compile(
    r"^((chapter|book|part)\s+([0-9]+|[ivxlcdm]+|[a-z]+)\b.{0,70}"
    r"|第[0-9０-９一二三四五六七八九十百千零〇]+[章回節节卷部話话].{0,40})$",
    re.IGNORECASE)


def _is_latin_single_byte(name: str) -> bool:
  try:
    return codecs.lookup(name).name in _LATIN_SINGLE_BYTE
  except LookupError:
    return False


def _utf16_without_bom(sample: bytes) -> str | None:
  """"utf-16-le" or "utf-16-be" for UTF-16 text written without a byte-order mark, else None.

  Told by its NUL bytes, so Latin-script text (every character below U+0100 has a NUL high
  byte): NULs in at least half of one parity's bytes and in almost none of the other's, the
  head decoding strictly, and nearly every character printable. (Such bytes are also valid
  UTF-8, decoding to NUL characters, which would otherwise make the file "binary".) Only the
  head decides, as `is_binary_file` sees it: a damaged code unit further on (or an odd last
  byte) becomes U+FFFD, as in any other encoding, not a reason to read the file as UTF-8.
  """
  head = sample[:BINARY_CHECK_BYTES]
  n = len(head) // 2
  if n < 8 or b"\x00" not in head:
    return None
  even, odd = head[0:2 * n:2].count(0), head[1:2 * n:2].count(0)
  for nuls, others, name in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
    if nuls < n // 2 or others > n // 100:
      continue
    try:
      text = codecs.getincrementaldecoder(name)().decode(head[:2 * n], final=False)
    except UnicodeDecodeError:
      continue
    shown = sum(c.isprintable() or c in "\n\r\t" for c in text[:n])
    if shown >= 0.95 * min(len(text), n):
      return name
  return None


def detect_encoding(sample: bytes, complete: bool = True) -> str:
  """The encoding of `sample` (`complete=False`: it may end mid-character)."""
  for bom, name in _BOMS:
    if sample.startswith(bom):
      return name
  utf16 = _utf16_without_bom(sample)
  if utf16:
    return utf16
  try:
    codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
    return "utf-8"
  except UnicodeDecodeError:
    pass
  from charset_normalizer import from_bytes

  best = from_bytes(sample).best()
  name = best.encoding if best is not None else "latin-1"
  if _is_latin_single_byte(name):
    try:
      sample.decode("cp1252")
      return "cp1252"
    except UnicodeDecodeError:
      pass
  return name


def decode_bytes(raw: bytes) -> tuple[str, str]:
  """Decodes a whole file's bytes; returns (text, encoding)."""
  enc = detect_encoding(raw)
  return raw.decode(enc, errors="replace"), enc


def read_text_file(path: str) -> str:
  """The text of a file in any common encoding, newlines normalized to "\\n"."""
  with open(path, "rb") as f:
    text, _ = decode_bytes(f.read())
  return text.replace("\r\n", "\n").replace("\r", "\n")


def is_binary_file(path: str) -> bool:
  """Whether the head of `path` decodes to NUL characters (the TXT book rule).

  NUL bytes alone do not decide it: UTF-16 and UTF-32 text is full of them.
  """
  with open(path, "rb") as f:
    head = f.read(BINARY_CHECK_BYTES)
  if b"\x00" not in head:
    return False
  return "\x00" in head.decode(detect_encoding(head, complete=False), errors="replace")


def iter_text_chunks(path: str, chunk_bytes: int = 1 << 24) -> Iterator[str]:
  """Streams a large text file as decoded chunks (bounded memory).

  The encoding guessed from the first `SAMPLE_BYTES` is only a guess: a
  Windows-1252 file whose head is ASCII looks like UTF-8. So chunks are
  decoded strictly; at the first error the encoding is detected again on the
  head plus `SAMPLE_BYTES` from the bad byte on, and decoding resumes at the
  start of the failing chunk. What came before was ASCII in the common case,
  which every ASCII-compatible fallback decodes the same way, so the text
  equals `read_text_file`'s (a warning says when it was not). Bytes that no
  guess decodes become U+FFFD, as in `read_text_file`.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(SAMPLE_BYTES)
    enc = detect_encoding(head, complete=size <= SAMPLE_BYTES)
    f.seek(0)
    decoder = codecs.getincrementaldecoder(enc)(errors="strict")
    pending_cr, ascii_so_far, tried = False, True, {codecs.lookup(enc).name}
    while True:
      start = f.tell() - len(decoder.getstate()[0])  # First byte not yet decoded.
      raw = f.read(chunk_bytes)
      try:
        text = decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        bad = start + e.start  # The decoder saw its buffered bytes, then `raw`.
        f.seek(bad)
        sample = f.read(SAMPLE_BYTES)
        fallback = detect_encoding(head[:bad] + sample, complete=bad + len(sample) >= size)
        if not ascii_so_far:
          logging.warning("%s: not valid %s at byte %d; decoding from byte %d as %s",
                          path, enc, bad, start, fallback)
        # A guess made before means the bytes are just corrupt: replace them.
        errors = "replace" if codecs.lookup(fallback).name in tried else "strict"
        tried.add(codecs.lookup(fallback).name)
        enc, decoder = fallback, codecs.getincrementaldecoder(fallback)(errors=errors)
        f.seek(start)
        continue
      ascii_so_far = ascii_so_far and raw.isascii()
      if pending_cr:
        text = "\r" + text
      pending_cr = text.endswith("\r") and bool(raw)  # A "\r\n" may straddle two chunks.
      if pending_cr:
        text = text[:-1]
      text = text.replace("\r\n", "\n").replace("\r", "\n")
      if text:
        yield text
      if not raw:
        return


def split_chapters(paragraphs: list[str]) -> list[Chapter]:
  """Groups paragraphs into chapters at chapter-heading paragraphs."""
  chapters = [Chapter(None, [])]
  for p in paragraphs:
    if len(p) <= 80 and CHAPTER_LINE.match(p):
      chapters.append(Chapter(p, []))
    else:
      chapters[-1].paragraphs.append(p)
  return [c for c in chapters if c.title is not None or c.paragraphs]


def read_txt(path: str, options: ReadOptions, source: str | None = None) -> Document:
  """A TXT book: paragraphs split at blank lines, chapters at heading lines."""
  del options  # No options apply to plain text.
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise BookSkipped(f"unreadable ({e.strerror or e})") from None
  text, enc = decode_bytes(raw)
  if "\x00" in text:
    raise BookSkipped(f"not a text file (binary data; decoded as {enc})")
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  if any(not ln.strip() for ln in lines):
    paragraphs = lines_to_paragraphs(lines, guess_breaks=False)
  else:  # No blank lines at all: one paragraph per line.
    paragraphs = [p for p in (clean_inline(ln) for ln in lines) if p]
  if not paragraphs:
    raise BookSkipped("empty: no text found")
  name = source or os.path.basename(path)
  title = os.path.splitext(os.path.basename(name))[0]
  return Document(source=name, format="txt", title=title, chapters=split_chapters(paragraphs),
                  encoding=enc)
