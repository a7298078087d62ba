"""The reader-independent book model and its text rendering."""

from __future__ import annotations

import dataclasses
import re

CHAPTER_MARKER = "<chapter>"
PARAGRAPH_MARKER = "<p>"

_SPACES = re.compile(r"[ \t\r\f\v\u00a0\u3000]+")
# Scripts written without spaces between words: joining wrapped lines adds none.
_NO_SPACE_SCRIPT = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")


class BookSkipped(Exception):
  """A book that cannot be used; `str(e)` is the one-line reason."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  enable_ocr: bool = False  # OCR pages without a text layer (Tesseract).
  ocr_lang: str = "eng"  # Tesseract language(s), e.g. "eng" or "eng+chi_sim".
  ocr_dpi: int = 300


@dataclasses.dataclass
class Chapter:
  title: str | None  # None: text before the first chapter, or a book without chapters.
  paragraphs: list[str]


@dataclasses.dataclass
class Document:
  source: str  # Path relative to the input folder.
  format: str  # "pdf" | "epub" | "txt"
  title: str
  chapters: list[Chapter]
  pages: int = 0  # PDF pages (0 for EPUB/TXT).
  ocr_pages: int = 0  # Pages whose text came from OCR.
  pages_without_text: list[int] = dataclasses.field(default_factory=list)  # 1-based, not OCRed.
  encoding: str | None = None  # TXT only: the detected encoding.

  @property
  def num_paragraphs(self) -> int:
    return sum(len(c.paragraphs) for c in self.chapters)

  def render(self, preserve_structure: bool) -> str:
    """The book as one string (see the package docstring for the markers)."""
    out = []
    for ch in self.chapters:
      if not ch.paragraphs and not ch.title:
        continue
      if preserve_structure:
        if ch.title is not None:
          out.append(f"{CHAPTER_MARKER} {ch.title}".rstrip())
        out.extend(f"{PARAGRAPH_MARKER} {p}" for p in ch.paragraphs)
      else:
        if ch.title:
          out.append(ch.title)
        out.extend(ch.paragraphs)
    return ("\n" if preserve_structure else "\n\n").join(out)


def clean_inline(text: str) -> str:
  """Collapses runs of spaces and strips; keeps the characters themselves."""
  return _SPACES.sub(" ", text).strip()


def join_lines(a: str, b: str) -> str:
  """Joins two wrapped lines: removes a line-end hyphen, no space between CJK."""
  if not a:
    return b
  if a.endswith("-") and len(a) > 1 and a[-2].isalpha() and b[:1].islower():
    return a[:-1] + b
  if _NO_SPACE_SCRIPT.match(a[-1]) or _NO_SPACE_SCRIPT.match(b[:1]):
    return a + b
  return a + " " + b


_SENTENCE_END = tuple(".!?:;\"'\u201d\u2019)\u3002\uff01\uff1f\u300d\u300f\u2026")


def lines_to_paragraphs(lines: list[str], guess_breaks: bool = True) -> list[str]:
  """Rebuilds paragraphs from wrapped lines (PDF text, hard-wrapped TXT).

  A blank line always ends a paragraph. With `guess_breaks`, a line also ends
  one when it ends a sentence and is clearly shorter than the text width (the
  90th percentile line length), the usual look of a paragraph's last line.
  """
  stripped = [clean_inline(ln) for ln in lines]
  lengths = sorted(len(s) for s in stripped if s)
  if not lengths:
    return []
  width = lengths[int(0.9 * (len(lengths) - 1))]
  paragraphs, cur = [], ""
  for line in stripped:
    if not line:
      if cur:
        paragraphs.append(cur)
      cur = ""
      continue
    cur = join_lines(cur, line)
    if guess_breaks and line.endswith(_SENTENCE_END) and len(line) < 0.8 * width:
      paragraphs.append(cur)
      cur = ""
  if cur:
    paragraphs.append(cur)
  return paragraphs
