"""Real books for the tests and benchmarks: PDFs (fpdf2), EPUBs (ebooklib), scans (PIL)."""

from __future__ import annotations

import os

WHALE = ("The whale swam through the cold grey water while the sailors watched in silence "
         "from the deck of the ship. ")
CHINESE_CHAPTERS = [
    ("第一章 风起", ["天下大势，分久必合，合久必分。", "周末七国分争，并入于秦。"]),
    ("第二章 云涌", ["及秦灭之后，楚、汉分争，又并入于汉。"]),
]
JAPANESE = "吾輩は猫である。名前はまだ無い。\n\nどこで生れたかとんと見当がつかぬ。"
FRENCH = "Chapter 1\n\nLe café était très agréable, près de la forêt.\n\nOù êtes-vous, Zoë ?"
OCR_LINES = ["THE QUICK BROWN FOX", "JUMPS OVER THE LAZY DOG"]


def pdf_paragraph(chapter: int, i: int) -> str:
  return f"Paragraph {i} of chapter {chapter}. " + WHALE * 3 + "It was done."


def make_text_pdf(path: str, chapters: int = 2, paragraphs: int = 3, title: str = "Moby") -> str:
  """A PDF with a text layer, one outline entry (bookmark) per chapter."""
  from fpdf import FPDF

  pdf = FPDF()
  pdf.set_title(title)
  for c in range(1, chapters + 1):
    pdf.add_page()
    pdf.start_section(f"Chapter {c}: The Sea")
    pdf.set_font("Helvetica", size=16)
    pdf.cell(text=f"Chapter {c}: The Sea")
    pdf.ln(12)
    pdf.set_font("Helvetica", size=11)
    for i in range(paragraphs):
      pdf.multi_cell(0, 6, text=pdf_paragraph(c, i))
      pdf.ln(4)
  pdf.output(path)
  return path


def make_encrypted_pdf(path: str) -> str:
  from fpdf import FPDF

  pdf = FPDF()
  pdf.add_page()
  pdf.set_font("Helvetica", size=11)
  pdf.multi_cell(0, 6, text=WHALE)
  pdf.set_encryption(owner_password="owner", user_password="secret")
  pdf.output(path)
  return path


def make_scanned_pdf(path: str, lines=OCR_LINES) -> str:
  """A PDF whose only page is an image of text (no text layer)."""
  import matplotlib.font_manager as fm
  from fpdf import FPDF
  from PIL import Image, ImageDraw, ImageFont

  font = ImageFont.truetype(fm.findfont("DejaVu Sans"), 56)
  img = Image.new("L", (1400, 120 + 90 * len(lines)), 255)
  draw = ImageDraw.Draw(img)
  for i, line in enumerate(lines):
    draw.text((60, 60 + 90 * i), line, font=font, fill=0)
  pdf = FPDF(format=(140, 12 + 9 * len(lines)))  # mm: 1 px = 0.1 mm.
  pdf.add_page()
  pdf.image(img, x=0, y=0, w=140)
  pdf.output(path)
  return path


def make_pdf_pages(path: str, pages: list[list[str]]) -> str:
  """A PDF without an outline; each page holds its lines, one text line each."""
  from fpdf import FPDF

  pdf = FPDF()
  pdf.set_font("Helvetica", size=11)
  for lines in pages:
    pdf.add_page()
    for line in lines:
      pdf.cell(text=line)
      pdf.ln(6)
  pdf.output(path)
  return path


def make_epub(path: str, chapters, title: str = "A Tale", lang: str = "en") -> str:
  """An EPUB with one XHTML document per (heading, [paragraph html]) chapter."""
  return make_epub_bodies(path, [
      (heading or f"part {i}",
       (f"<h1>{heading}</h1>" if heading else "") + "".join(f"<p>{p}</p>" for p in paragraphs))
      for i, (heading, paragraphs) in enumerate(chapters)], title, lang)


def make_epub_bodies(path: str, bodies, title: str = "A Tale", lang: str = "en") -> str:
  """An EPUB with one XHTML document per (table-of-contents title, body html)."""
  from ebooklib import epub

  book = epub.EpubBook()
  book.set_identifier(f"id-{os.path.basename(path)}")
  book.set_title(title)
  book.set_language(lang)
  items = []
  for i, (toc_title, body) in enumerate(bodies):
    ch = epub.EpubHtml(title=toc_title, file_name=f"ch{i}.xhtml", lang=lang)
    ch.content = f"<html><body>{body}</body></html>"
    book.add_item(ch)
    items.append(ch)
  book.toc = items
  book.add_item(epub.EpubNcx())
  book.add_item(epub.EpubNav())
  book.spine = ["nav", *items]
  epub.write_epub(path, book)
  return path


def make_library(folder: str, scanned: bool = True) -> str:
  """A folder with good, bad and odd books (see tests/test_books.py)."""
  os.makedirs(folder, exist_ok=True)
  j = lambda name: os.path.join(folder, name)
  make_text_pdf(j("moby.pdf"))
  make_epub(j("tale.epub"), [
      ("Chapter One", ["It was the <em>best</em> of times,", "it was the worst of times."]),
      ("Chapter Two", ["A <span>tale</span> of two cities."])])
  make_epub(j("chinese.epub"), [(h, ps) for h, ps in CHINESE_CHAPTERS], title="三国", lang="zh")
  make_epub(j("empty.epub"), [("", [""])], title="Empty")
  make_encrypted_pdf(j("locked.pdf"))
  with open(j("broken.pdf"), "wb") as f:
    f.write(b"%PDF-1.4\n this is not really a pdf \x00\x01\x02")
  with open(j("french.txt"), "wb") as f:
    f.write(FRENCH.encode("cp1252"))
  os.makedirs(j("jp"), exist_ok=True)
  with open(j(os.path.join("jp", "neko.txt")), "wb") as f:
    f.write(JAPANESE.encode("shift_jis"))
  open(j("zero.txt"), "wb").close()
  with open(j("notes.md"), "w") as f:
    f.write("not a book")
  if scanned:
    make_scanned_pdf(j("scan.pdf"))
  return folder
