r"""Turns a folder of PDF, EPUB and TXT books into a training corpus.

Run:
  python -m hope_jax.preprocess_books --input=books/ --output=corpus/ \
      [--preserve_structure] [--enable_ocr] [--lang=eng] [--vocab=old/vocab.json]

Writes corpus.jsonl, vocab.json, metadata.json, tokens.bin and text/*.txt
(see docs/data.md), then prints a summary and the flags to train on it:
  python -m hope_jax.train --config=experiments/base.py \
      --config.data.data_type=books --config.data.data_path=corpus/ \
      --config.model.vocab_size=<vocab_size from the summary>
Exit status 2 with a one-line message on bad input (no traceback).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from hope_jax.config import ConfigError

_INPUT = flags.DEFINE_string("input", None, "Folder of books (.pdf, .epub, .txt), searched recursively.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (created if missing).")
_STRUCTURE = flags.DEFINE_bool(
    "preserve_structure", False, "Keep '<chapter> Title' and '<p> ' markers in the text.")
_OCR = flags.DEFINE_bool("enable_ocr", False, "OCR PDF pages without a text layer (Tesseract).")
_LANG = flags.DEFINE_string("lang", "eng", "Tesseract language(s) for OCR, e.g. eng or eng+chi_sim.")
_VOCAB = flags.DEFINE_string("vocab", None, "Reuse this vocab.json instead of building one.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar, no summary.")


def summary(meta: dict, output: str) -> str:
  """The human-readable report printed at the end."""
  formats = ", ".join(f"{n} {k}" for k, n in sorted(meta["by_format"].items()))
  lines = [
      f"Read {meta['books_read']} of {meta['books_found']} books ({formats}): "
      f"{meta['pages']} PDF pages ({meta['ocr_pages']} by OCR), {meta['chapters']} chapters, "
      f"{meta['paragraphs']} paragraphs, {meta['characters']:,} characters, "
      f"{meta['num_tokens']:,} tokens",
      f"Vocabulary: {meta['vocab_size']} tokens (PAD, UNK and {meta['vocab_size'] - 2} characters)"
      + (f"; {meta['unknown_tokens']:,} characters outside it became UNK"
         if meta["unknown_tokens"] else "")]
  if meta["skipped"]:
    lines.append(f"Skipped {meta['books_skipped']}:")
    lines += [f"  {s['file']}: {s['reason']}" for s in meta["skipped"]]
  if meta["needs_ocr"]:
    lines.append("Pages without a text layer, not OCRed (rerun with --enable_ocr):")
    lines += [f"  {n['file']}: pages {n['pages']}" for n in meta["needs_ocr"]]
  if meta["ignored_files"]:
    lines.append(f"Ignored {len(meta['ignored_files'])} file(s) of other types.")
  lines.append(f"Wrote corpus.jsonl, vocab.json, metadata.json, tokens.bin and text/ to {output}")
  lines.append(f"Train with: --config.data.data_type=books --config.data.data_path={output} "
               f"--config.model.vocab_size={meta['vocab_size']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  from hope_jax.data import books
  from hope_jax.data.readers import ReadOptions

  try:
    if not _OUTPUT.value:
      raise ConfigError("--output is required: the folder to write the corpus to")
    meta = books.preprocess(
        _INPUT.value, _OUTPUT.value, preserve_structure=_STRUCTURE.value,
        options=ReadOptions(enable_ocr=_OCR.value, ocr_lang=_LANG.value), vocab_path=_VOCAB.value,
        progress=not _QUIET.value and sys.stderr.isatty(),
        warn=lambda msg: print(msg, file=sys.stderr))
  except ConfigError as e:
    print(f"preprocess_books: error: {e}", file=sys.stderr)
    sys.exit(2)
  if not _QUIET.value:
    print(summary(meta, os.path.normpath(_OUTPUT.value)))


if __name__ == "__main__":
  app.run(main)
