"""PDF books via pypdf; pages without a text layer go to OCR when enabled."""

from __future__ import annotations

import logging
import os
import re

from hope_jax.data.readers.document import (
  BookSkipped,
  Chapter,
  Document,
  ReadOptions,
  clean_inline,
  lines_to_paragraphs,
)

_ARABIC = re.compile(r"(\d{1,4})|-\s*(\d{1,4})\s*-")  # "12", "- 12 -"
_ROMAN = re.compile(r"c{0,3}(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})", re.IGNORECASE)  # 1..399
_ROMAN_VALUES = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}


def _page_number(line: str) -> int | None:
  """The value of a line that is only a page number (`12`, `- 12 -`, `xiv`), else None."""
  s = line.strip()
  if m := _ARABIC.fullmatch(s):
    return int(m.group(1) or m.group(2))
  if s and _ROMAN.fullmatch(s):
    vals = [_ROMAN_VALUES[c] for c in s.lower()]
    return sum(-v if v < w else v for v, w in zip(vals, vals[1:] + [0], strict=True))
  return None


def strip_page_numbers(pages: list[list[str]]) -> None:
  """Drops running page numbers from each page's lines, in place.

  Only the first and the last non-blank line of a page can go, and only when
  it is a lone number (arabic, `- 12 -`, or a roman numeral up to 399 in either
  case) and a page at most two away holds the matching number at either end
  (13 on the next page, 10 two pages back), as running numbers do. A word
  (`I`, `mix`, `did`), a year, or a number on a page with no numbered
  neighbour stays; a one-page PDF keeps its number.
  """
  ends = []  # Per page: {line index: value} of its numbered end lines.
  for lines in pages:
    filled = [k for k, line in enumerate(lines) if line.strip()]
    values = {k: _page_number(lines[k]) for k in {filled[0], filled[-1]}} if filled else {}
    ends.append({k: v for k, v in values.items() if v is not None})
  drops = [[k for k, v in numbered.items()
            if any(0 <= i + d < len(ends) and v + d in ends[i + d].values()
                   for d in (-2, -1, 1, 2))]
           for i, numbered in enumerate(ends)]
  for lines, drop in zip(pages, drops, strict=True):
    for k in sorted(drop, reverse=True):
      del lines[k]


def _has_images(page) -> bool:
  """Whether the page draws an image XObject (directly or in a form)."""

  def scan(resources, depth):
    xobjects = resources.get("/XObject") if resources else None
    if xobjects is None:
      return False
    xobjects = xobjects.get_object()
    for name in xobjects:
      obj = xobjects[name].get_object()
      if obj.get("/Subtype") == "/Image":
        return True
      if obj.get("/Subtype") == "/Form" and depth < 3 and scan(obj.get("/Resources"), depth + 1):
        return True
    return False

  try:
    res = page.get("/Resources")
    return scan(res.get_object() if res is not None else None, 0)
  except Exception:  # A broken resource dictionary: treat as no images.
    return False


def _chapter_starts(reader) -> dict[int, str]:
  """0-based page -> title of the top-level outline (bookmark) entries."""
  starts: dict[int, str] = {}
  try:
    for entry in reader.outline:
      if isinstance(entry, list):  # Children of the previous entry.
        continue
      page = reader.get_destination_page_number(entry)
      if page is not None and page >= 0:
        starts.setdefault(page, clean_inline(str(entry.title)))
  except Exception as e:  # Broken outlines are common; the text is still usable.
    logging.debug("ignoring a broken PDF outline: %s", e)
  return starts


def read_pdf(path: str, options: ReadOptions, source: str | None = None) -> Document:
  """Reads the text layer of every page; chapters come from the outline."""
  from pypdf import PdfReader
  from pypdf.errors import DependencyError, PdfReadError

  # pypdf logs every repair it makes on damaged files; the skip reason says enough.
  logging.getLogger("pypdf").setLevel(logging.ERROR)
  name = source or os.path.basename(path)
  try:
    with open(path, "rb") as f:  # The header may follow up to 1 KiB of junk (PDF 1.7, 7.5.2).
      if b"%PDF-" not in f.read(1024):
        raise BookSkipped("not a PDF (no %PDF- header in its first 1024 bytes; a web page or "
                          "another format saved as .pdf?)")
    reader = PdfReader(path, strict=False)
    if reader.is_encrypted:
      try:
        ok = reader.decrypt("")
      except (DependencyError, NotImplementedError) as e:
        raise BookSkipped(f"encrypted (cannot decrypt: {e})") from None
      if not ok:
        raise BookSkipped("encrypted (a password is required to open it)")
    pages = list(reader.pages)
  except BookSkipped:
    raise
  except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
    raise BookSkipped(f"corrupt PDF ({type(e).__name__}: {str(e)[:120]})") from None
  if not pages:
    raise BookSkipped("empty: the PDF has no pages")

  page_texts, failed, no_text = [], 0, []
  for page in pages:
    try:
      page_texts.append(page.extract_text() or "")
    except Exception as e:  # pypdf raises many types on damaged content streams.
      logging.debug("page text extraction failed in %s: %s", name, e)
      page_texts.append("")
      failed += 1
  if failed == len(pages):
    raise BookSkipped("corrupt PDF (text extraction failed on every page)")
  for i, page in enumerate(pages):
    if not page_texts[i].strip() and _has_images(page):
      no_text.append(i)

  ocr_pages = 0
  if no_text and options.enable_ocr:
    from hope_jax.data.readers import ocr

    for i in no_text:
      page_texts[i] = ocr.ocr_pdf_page(path, i + 1, options.ocr_lang, options.ocr_dpi)
      ocr_pages += 1
    no_text = []
  if not any(t.strip() for t in page_texts):
    if no_text:
      raise BookSkipped(f"needs OCR: {len(no_text)} of {len(pages)} pages are images without a "
                        "text layer (rerun with --enable_ocr)")
    raise BookSkipped("empty: no text on any page")

  starts = _chapter_starts(reader)
  chapters: list[Chapter] = []
  lines: list[str] = []
  title: str | None = None

  def flush():
    body = list(lines)
    while body and not body[0].strip():
      body.pop(0)
    if title and body and clean_inline(body[0]) == title:  # The heading printed on the page.
      body.pop(0)
    paragraphs = lines_to_paragraphs(body)
    if paragraphs or title:
      chapters.append(Chapter(title, paragraphs))

  page_lines = [text.split("\n") for text in page_texts]
  strip_page_numbers(page_lines)
  for i, text_lines in enumerate(page_lines):
    if i in starts:
      flush()
      lines, title = [], starts[i]
    lines.extend(text_lines)
  flush()
  meta = reader.metadata
  meta_title = clean_inline(str(meta.title)) if meta is not None and meta.title else ""
  return Document(source=name, format="pdf", title=meta_title or os.path.splitext(
      os.path.basename(name))[0], chapters=chapters, pages=len(pages), ocr_pages=ocr_pages,
      pages_without_text=[i + 1 for i in no_text])
