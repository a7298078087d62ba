"""Book readers: PDF (pypdf, Tesseract OCR), EPUB (ebooklib + BeautifulSoup), plain text.

Every reader turns one file into a `Document` (chapters of paragraphs) or
raises `BookSkipped` with a one-line reason. `Document.render` writes the
text, with the structure markers below when asked:

  <chapter> Chapter title        (one line opening each chapter)
  <p> Paragraph text             (one line per paragraph)

Without markers, chapter titles and paragraphs are separated by blank lines.
"""

from __future__ import annotations

import os

from hope_jax.data.readers.document import (
  CHAPTER_MARKER,
  PARAGRAPH_MARKER,
  BookSkipped,
  Chapter,
  Document,
  ReadOptions,
)

SUPPORTED_EXTENSIONS = (".pdf", ".epub", ".txt")


def read_book(path: str, options: ReadOptions) -> Document:
  """Reads one book; the reader is picked by the file extension.

  Raises:
    BookSkipped: unreadable, encrypted, empty, corrupt, needs OCR, or not a book.
  """
  ext = os.path.splitext(path)[1].lower()
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise BookSkipped(f"unreadable ({e.strerror or e})") from None
  if size == 0:
    raise BookSkipped("empty file (0 bytes)")
  if not os.access(path, os.R_OK):
    raise BookSkipped("unreadable (permission denied)")
  if ext == ".pdf":
    from hope_jax.data.readers import pdf

    return pdf.read_pdf(path, options)
  if ext == ".epub":
    from hope_jax.data.readers import epub

    return epub.read_epub(path, options)
  if ext == ".txt":
    from hope_jax.data.readers import text

    return text.read_txt(path, options)
  raise BookSkipped(f"unsupported file type {ext!r} (expected one of {SUPPORTED_EXTENSIONS})")


__all__ = ["BookSkipped", "CHAPTER_MARKER", "Chapter", "Document", "PARAGRAPH_MARKER",
           "ReadOptions", "SUPPORTED_EXTENSIONS", "read_book"]
