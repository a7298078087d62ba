"""EPUB books: ebooklib for the container, BeautifulSoup for HTML to text."""

from __future__ import annotations

import os
import warnings
import zipfile

from hope_jax.data.readers.document import BookSkipped, Chapter, Document, ReadOptions, clean_inline

_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
_BLOCKS = ("p", "li", "blockquote", "pre", "dd", "dt", "figcaption", "caption", "td", "th",
           "div", "section", "article") + _HEADINGS
_DROP = ("script", "style", "head", "nav", "rt", "rp")  # rt/rp: ruby readings in Japanese.


def _text_runs(root) -> list[tuple[str, str, bool]]:
  """(block name, text, loose) for each run of text under `root`, in document order.

  A run ends where a block element starts or ends. It is the text of an
  innermost block (`loose` False), or text sitting directly in a container
  beside its blocks, or in `root` itself (`loose` True). Iterative, so deep
  nesting cannot exhaust the recursion limit.
  """
  from bs4 import CData, NavigableString, Tag

  runs, buf = [], []
  blocks = [[root.name, True]]  # The open blocks: [name, holds a block].

  def flush():
    text = "".join(buf)
    buf.clear()
    if text.strip():
      runs.append((blocks[-1][0], text, blocks[-1][1]))

  todo = [(iter(root.children), False)]  # (children left, their parent is a block).
  while todo:
    node = next(todo[-1][0], None)
    if node is None:
      if todo.pop()[1]:  # A block ends: so does its run.
        flush()
        blocks.pop()
    elif isinstance(node, Tag):
      block = node.name in _BLOCKS
      if block:
        blocks[-1][1] = True
        flush()
        blocks.append([node.name, False])
      todo.append((iter(node.children), block))  # Inline tags: their text joins the run.
    elif type(node) in (NavigableString, CData):  # Not comments or doctypes.
      buf.append(str(node))
  flush()
  return runs


def html_to_chapter(html: bytes | str, toc_title: str | None = None) -> Chapter:
  """One XHTML spine document -> a chapter: its first heading and its paragraphs.

  Each innermost block element is a paragraph; inline markup (<em>, <span>,
  <a>, ruby bases) is joined without spaces so words are not split. Text
  outside any innermost block (directly in <body> or in a <div> beside its
  <p>s) is kept in place, one paragraph per line, as no element marks its
  paragraphs.
  """
  from bs4 import BeautifulSoup

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # XML-as-HTML notices from bs4.
    soup = BeautifulSoup(html, "html.parser")
  for tag in soup.find_all(_DROP):
    tag.decompose()
  for br in soup.find_all("br"):
    br.replace_with("\n")
  title, paragraphs = None, []
  for name, text, loose in _text_runs(soup.body or soup):
    lines = [clean_inline(s) for s in text.split("\n")]
    if loose:
      paragraphs += [s for s in lines if s]
      continue
    text = " ".join(s for s in lines if s) if name != "pre" else "\n".join(lines).strip()
    if not text:
      continue
    if name in _HEADINGS and title is None and not paragraphs:
      title = text
    else:
      paragraphs.append(text)
  return Chapter(title if title is not None else toc_title, paragraphs)


def _toc_titles(book) -> dict[str, str]:
  """href (without fragment) -> title from the table of contents."""
  out = {}

  def visit(entries):
    for e in entries:
      if isinstance(e, tuple):  # (Section, [children])
        section, children = e
        if getattr(section, "href", None):
          out.setdefault(section.href.split("#")[0], section.title)
        visit(children)
      elif getattr(e, "href", None):
        out.setdefault(e.href.split("#")[0], e.title)

  visit(book.toc or [])
  return out


def _has_encrypted_documents(path: str) -> bool:
  """True when META-INF/encryption.xml enciphers (X)HTML, not just fonts."""
  import re

  try:
    with zipfile.ZipFile(path) as z:
      if "META-INF/encryption.xml" not in z.namelist():
        return False
      xml = z.read("META-INF/encryption.xml").decode("utf-8", errors="replace")
  except (zipfile.BadZipFile, OSError):
    return False
  return any(u.lower().endswith((".html", ".xhtml", ".htm"))
             for u in re.findall(r'URI="([^"]+)"', xml))


def read_epub(path: str, options: ReadOptions, source: str | None = None) -> Document:
  """Reads the spine documents in reading order, one chapter each."""
  del options
  import ebooklib
  from ebooklib import epub

  if not zipfile.is_zipfile(path):
    raise BookSkipped("corrupt EPUB (not a ZIP container)")
  if _has_encrypted_documents(path):
    raise BookSkipped("encrypted (DRM-protected EPUB: its text documents are enciphered)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # ebooklib's future-default notices.
      book = epub.read_epub(path, {"ignore_ncx": False})
  except Exception as e:  # ebooklib raises bare exceptions, KeyError, lxml errors, ...
    raise BookSkipped(f"corrupt EPUB ({type(e).__name__}: {str(e)[:120]})") from None
  toc = _toc_titles(book)
  chapters = []
  for idref, *_ in book.spine:
    item = book.get_item_with_id(idref)
    if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
      continue
    try:
      content = item.get_content()
    except Exception as e:
      raise BookSkipped(f"corrupt EPUB (cannot read {item.get_name()}: {e})") from None
    ch = html_to_chapter(content, toc.get(item.get_name()))
    if ch.paragraphs or ch.title:
      chapters.append(ch)
  if not any(c.paragraphs for c in chapters):
    raise BookSkipped("empty: no text found in the EPUB's documents")
  meta_title = book.get_metadata("DC", "title")
  name = source or os.path.basename(path)
  title = meta_title[0][0] if meta_title else os.path.splitext(os.path.basename(name))[0]
  return Document(source=name, format="epub", title=title, chapters=chapters)
