"""Tesseract OCR for PDF pages without a text layer (pdf2image + pytesseract).

Needs the `tesseract` and `pdftoppm` (poppler) programs; on Debian/Ubuntu:
`apt-get install tesseract-ocr poppler-utils` plus `tesseract-ocr-<lang>` for
languages other than English (see docs/data.md).
"""

from __future__ import annotations

import shutil

from hope_jax.config import ConfigError

_INSTALL = ("install it with `apt-get install tesseract-ocr poppler-utils` "
            "(macOS: `brew install tesseract poppler`)")


def check_available(lang: str) -> None:
  """Raises a one-line ConfigError unless OCR in `lang` can run here."""
  for program in ("tesseract", "pdftoppm"):
    if shutil.which(program) is None:
      raise ConfigError(f"OCR was asked for but `{program}` is not on PATH; {_INSTALL}")
  import pytesseract

  try:
    have = set(pytesseract.get_languages(config=""))
  except Exception as e:  # pytesseract wraps tesseract failures in several types.
    raise ConfigError(f"OCR: tesseract does not run ({e}); {_INSTALL}") from None
  missing = [code for code in lang.split("+") if code not in have]
  if missing:
    raise ConfigError(
        f"OCR language(s) {missing} are not installed for tesseract (installed: "
        f"{sorted(have)}); install e.g. `apt-get install tesseract-ocr-{missing[0].replace('_', '-')}`"
        f" or choose installed ones (preprocess_books --lang, or data.ocr_lang in training)")


def ocr_pdf_page(path: str, page_number: int, lang: str, dpi: int) -> str:
  """Renders 1-based page `page_number` of a PDF and returns Tesseract's text."""
  import pdf2image
  import pytesseract

  images = pdf2image.convert_from_path(path, dpi=dpi, first_page=page_number,
                                       last_page=page_number, grayscale=True)
  return "\n\n".join(pytesseract.image_to_string(img, lang=lang) for img in images)
