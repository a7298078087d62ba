"""Book corpora: preprocessing a folder of PDF/EPUB/TXT books, and `data_type='books'`.

`preprocess` writes to the output folder (schemas in docs/data.md):
  corpus.jsonl   one JSON object per book: its text, token ids and statistics
  vocab.json     the character vocabulary (PAD=0, UNK=1), any Unicode script
  metadata.json  corpus statistics: books read/skipped (with reasons), pages, ...
  tokens.bin     every book's ids back to back (uint8/uint16/uint32), memory-mapped in training
  text/<book>.txt  the extracted text of each book (`a/b.pdf` -> `a__b.pdf.txt`)

`load_books_corpus` reads such a folder (memory-mapped) or parses a folder
of raw books at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np

from hope_jax.config import ConfigError
from hope_jax.data import token_store
from hope_jax.data.corpus import BOOKS_FORMAT as META_FORMAT
from hope_jax.data.corpus import Corpus, _tokenizer_for, check_vocab, is_book_corpus_folder, split
from hope_jax.data.readers import (
  CHAPTER_MARKER,
  PARAGRAPH_MARKER,
  SUPPORTED_EXTENSIONS,
  BookSkipped,
  Document,
  ReadOptions,
  read_book,
)
from hope_jax.data.tokenizers import CharTokenizer

DOC_SEPARATOR = "\n\n"  # Between books in tokens.bin.
# A file name that is not UTF-8 comes from os.listdir with lone surrogates, which UTF-8
# cannot write; as backslash escapes they are JSON's own "\udcXX", read back unchanged.
JSON_PATH_ERRORS = "backslashreplace"
TEXT_DIR = "text"
_NAME_BYTES = 200  # Longest name written under text/; file systems allow 255 bytes.


def find_books(input_dir: str, exclude: str | None = None,
               warn: Callable[[str], None] = logging.warning) -> tuple[list[str], list[str]]:
  """(books, ignored): relative paths of supported and of other files, sorted.

  Hidden files and folders are skipped, and so are `exclude` (the output
  folder) and every preprocessed corpus inside the input folder (an earlier
  output: its text/*.txt would be read as books again), each with a `warn`.
  """
  books, ignored = [], []
  exclude = os.path.realpath(exclude) if exclude else None

  def keep(folder: str) -> bool:
    if os.path.realpath(folder) == exclude:
      return False
    if is_book_corpus_folder(folder):
      warn(f"skipped folder {folder}: a preprocessed book corpus "
           f"(metadata.json format {META_FORMAT})")
      return False
    return True

  for root, dirs, names in os.walk(input_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and keep(os.path.join(root, d)))
    for name in sorted(names):
      if name.startswith("."):
        continue
      rel = os.path.relpath(os.path.join(root, name), input_dir)
      (books if name.lower().endswith(SUPPORTED_EXTENSIONS) else ignored).append(rel)
  return sorted(books), sorted(ignored)


def iter_documents(input_dir: str, books: list[str], options: ReadOptions
                   ) -> Iterator[tuple[str, Document | None, str | None]]:
  """(relative path, document or None, skip reason or None) for each book."""
  for rel in books:
    try:
      doc = read_book(os.path.join(input_dir, rel), options)
      doc.source = rel
      yield rel, doc, None
    except BookSkipped as e:
      yield rel, None, str(e)


def _check_folders(input_dir: str, output_dir: str | None) -> None:
  if not input_dir:
    raise ConfigError("--input is required: a folder of PDF, EPUB or TXT books")
  if not os.path.exists(input_dir):
    raise ConfigError(f"input folder does not exist: {input_dir}")
  if not os.path.isdir(input_dir):
    raise ConfigError(f"input must be a folder of books, but {input_dir} is a file")
  if is_book_corpus_folder(input_dir):
    raise ConfigError(f"input {input_dir} is already a preprocessed book corpus; pass the folder "
                      "of PDF, EPUB or TXT books it was made from")
  if output_dir is None:
    return
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ConfigError(f"output must be a folder, but {output_dir} is a file")
  try:
    os.makedirs(os.path.join(output_dir, TEXT_DIR), exist_ok=True)
  except OSError as e:
    raise ConfigError(f"cannot create the output folder {output_dir}: {e.strerror or e}") from None


def _text_name(rel: str, taken: set[str]) -> str:
  """A file name under text/ for book `rel`, unique among `taken` (which it joins).

  Normally the path with `/` as `__` plus `.txt`. A name over _NAME_BYTES
  (deep or CJK paths) or one already taken (`a/b.txt` and `a__b.txt`; case is
  ignored for case-insensitive file systems) is cut and gets a hash of `rel`.
  """
  flat = rel.replace(os.sep, "__").replace("/", "__")
  name = flat + ".txt"
  if len(os.fsencode(name)) > _NAME_BYTES or name.casefold() in taken:
    digest = hashlib.sha1(os.fsencode(rel)).hexdigest()[:10]
    stem = os.fsencode(flat)[:_NAME_BYTES - 20].decode("utf-8", "ignore")
    name, n = f"{stem}~{digest}.txt", 1
    while name.casefold() in taken:  # Only on a hash collision.
      name, n = f"{stem}~{digest}-{n}.txt", n + 1
  taken.add(name.casefold())
  return name


def preprocess(input_dir: str, output_dir: str, *, preserve_structure: bool = False,
               options: ReadOptions | None = None, vocab_path: str | None = None,
               progress: bool = False, warn: Callable[[str], None] = logging.warning) -> dict:
  """Turns a folder of books into a training folder; returns the metadata.

  Args:
    input_dir: folder searched recursively for .pdf, .epub and .txt files.
    output_dir: created if missing; its corpus files are overwritten.
    preserve_structure: keep `<chapter>` / `<p>` markers in the text.
    options: OCR settings for the readers.
    vocab_path: reuse this vocab.json instead of building one (characters
      outside it become UNK and are counted in the metadata).
    progress: show a tqdm progress bar.
    warn: receives one line per skipped book.

  Raises:
    ConfigError: bad folders, a vocab_path that is not a vocabulary, OCR
      asked for but not installed, or no usable book (metadata.json is still
      written, with every skip reason).
  """
  t0 = time.perf_counter()
  options = options or ReadOptions()
  _check_folders(input_dir, output_dir)
  try:
    fixed_vocab = CharTokenizer.load(vocab_path) if vocab_path else None
  except ConfigError as e:  # Its message names the training config key; here it is the flag.
    raise ConfigError(str(e).replace("data.tokenizer_path", "--vocab", 1)) from None
  if options.enable_ocr:
    from hope_jax.data.readers import ocr

    ocr.check_available(options.ocr_lang)
  from tqdm import tqdm

  say = tqdm.write if progress else warn
  books, ignored = find_books(input_dir, exclude=output_dir,
                              warn=lambda msg: say(f"warning: {msg}"))
  bar = tqdm(total=len(books), unit="book", disable=not progress, dynamic_ncols=True)
  meta: dict[str, Any] = {
      "format": META_FORMAT, "input": input_dir,
      "options": {"preserve_structure": preserve_structure, "enable_ocr": options.enable_ocr,
                  "ocr_lang": options.ocr_lang},
      "markers": ({"chapter": CHAPTER_MARKER, "paragraph": PARAGRAPH_MARKER}
                  if preserve_structure else None),
      "books_found": len(books), "books_read": 0, "books_skipped": 0, "skipped": [],
      "needs_ocr": [], "ignored_files": ignored, "by_format": {}, "pages": 0, "ocr_pages": 0,
      "chapters": 0, "paragraphs": 0, "characters": 0}
  docs, counts, text_names = [], Counter(DOC_SEPARATOR), set()
  for rel, doc, reason in iter_documents(input_dir, books, options):
    bar.update(1)
    bar.set_postfix_str(os.path.basename(rel)[:40])
    if doc is None:
      meta["skipped"].append({"file": rel, "reason": reason})
      say(f"warning: skipped {rel}: {reason}")
      continue
    text = doc.render(preserve_structure)
    text_file = f"{TEXT_DIR}/{_text_name(rel, text_names)}"
    with open(os.path.join(output_dir, text_file), "w", encoding="utf-8") as f:
      f.write(text)
    counts.update(text)
    if doc.pages_without_text:
      meta["needs_ocr"].append({"file": rel, "pages": doc.pages_without_text})
      say(f"warning: {rel}: pages {doc.pages_without_text} have no text layer and were not "
          "OCRed (use --enable_ocr)")
    docs.append({"id": len(docs), "source": rel, "format": doc.format, "title": doc.title,
                 "text_file": text_file, "pages": doc.pages,
                 "ocr_pages": doc.ocr_pages, "chapters": len(doc.chapters),
                 "paragraphs": doc.num_paragraphs, "num_chars": len(text),
                 "encoding": doc.encoding})
    meta["by_format"][doc.format] = meta["by_format"].get(doc.format, 0) + 1
    for key in ("pages", "ocr_pages"):
      meta[key] += getattr(doc, key)
    meta["chapters"] += len(doc.chapters)
    meta["paragraphs"] += doc.num_paragraphs
    meta["characters"] += len(text)
  bar.close()
  meta["books_read"], meta["books_skipped"] = len(docs), len(meta["skipped"])

  if not docs:
    token_store.write_json(os.path.join(output_dir, "metadata.json"), meta)
    reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in meta["skipped"][:5])
    raise ConfigError(f"no usable books in {input_dir} ({len(books)} found"
                      + (f"; skipped: {reasons}" if reasons else "") + ")")

  tok = fixed_vocab or CharTokenizer.from_counts(counts)
  sep_ids = tok.encode(DOC_SEPARATOR)
  unknown = 0
  with token_store.TokenWriter(os.path.join(output_dir, "tokens.bin"), tok.vocab_size) as out, \
      open(os.path.join(output_dir, "corpus.jsonl"), "w", encoding="utf-8",
           errors=JSON_PATH_ERRORS) as jsonl:
    for d in docs:
      with open(os.path.join(output_dir, d["text_file"]), encoding="utf-8") as f:
        text = f.read()
      ids = tok.encode(text)
      unknown += int(np.count_nonzero(ids == 1))
      d["token_offset"], d["num_tokens"] = out.write(ids), int(ids.size)
      out.write(sep_ids)
      jsonl.write(json.dumps({**d, "text": text, "token_ids": ids.tolist()},
                             ensure_ascii=False) + "\n")
    num_tokens = out.count
  tok.save(os.path.join(output_dir, "vocab.json"))
  meta.update({
      "tokenizer": "char", "vocab_file": "vocab.json", "vocab_size": tok.vocab_size,
      "unknown_tokens": unknown, "num_tokens": num_tokens, "tokens_file": "tokens.bin",
      "tokens_dtype": token_store.dtype_for(tok.vocab_size).name,
      "document_separator": DOC_SEPARATOR, "seconds": round(time.perf_counter() - t0, 3)})
  token_store.write_json(os.path.join(output_dir, "metadata.json"), meta)
  return meta


# ------------------------------------------------------------ training corpus


def is_preprocessed(folder: str) -> bool:
  return (os.path.isfile(os.path.join(folder, "metadata.json"))
          and os.path.isfile(os.path.join(folder, "corpus.jsonl")))


def _damaged(folder: str, problem: str) -> ConfigError:
  """The error for a preprocessed folder whose files are missing or malformed."""
  return ConfigError(f"data.data_path: {problem}; the preprocessed folder {folder} is damaged, "
                     "re-run python -m hope_jax.preprocess_books to rebuild it")


def load_preprocessed_tokens(folder: str) -> tuple[np.ndarray, CharTokenizer, dict]:
  """(token ids, tokenizer, metadata) of a preprocessed folder; ids memory-mapped.

  Raises:
    ConfigError: naming `data.data_path` and the file, if the folder is not a
      book corpus, has no usable books, or has a missing or malformed file.
  """
  meta_path = os.path.join(folder, "metadata.json")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _damaged(folder, f"cannot read {meta_path} ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
    raise ConfigError(f"data.data_path: {meta_path} is not a hope_jax book corpus "
                      f"(expected format={META_FORMAT!r}); run python -m hope_jax.preprocess_books")
  if "vocab_size" not in meta:
    raise ConfigError(f"data.data_path: {folder} has no usable books (see {meta_path})")
  for key in ("books_read", "num_tokens", "tokens_dtype"):  # Written with vocab_size.
    if key not in meta:
      raise _damaged(folder, f"{meta_path} lacks the key {key!r}")
  vocab_path = os.path.join(folder, meta.get("vocab_file") or "vocab.json")
  if not os.path.isfile(vocab_path):
    raise _damaged(folder, f"the vocabulary {vocab_path} is missing")
  try:
    tok = CharTokenizer.load(vocab_path)
  except ConfigError as e:  # Its message names data.tokenizer_path, which the user did not set.
    raise _damaged(folder, str(e).removeprefix("data.tokenizer_path: ")) from None
  tokens_path = os.path.join(folder, meta.get("tokens_file") or "tokens.bin")
  if os.path.isfile(tokens_path):
    try:
      tokens = token_store.open_tokens(tokens_path, meta["tokens_dtype"], meta["num_tokens"])
    except ConfigError as e:
      raise _damaged(folder, str(e)) from None
  else:  # Only corpus.jsonl: gather its ids in memory.
    sep = tok.encode(meta.get("document_separator", DOC_SEPARATOR))
    parts, jsonl = [], os.path.join(folder, "corpus.jsonl")
    try:
      with open(jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
          try:
            ids = np.asarray(json.loads(line)["token_ids"], dtype=np.int32)
          except json.JSONDecodeError as e:
            raise _damaged(folder, f"{jsonl}: line {n} is not JSON (column {e.colno}: "
                                    f"{e.msg})") from None
          except (KeyError, TypeError, ValueError):
            raise _damaged(folder, f"{jsonl}: line {n} has no 'token_ids' list of ids") from None
          parts += [ids, sep]
    except (OSError, UnicodeDecodeError) as e:
      raise _damaged(folder, f"cannot read {jsonl} ({e})") from None
    tokens = np.concatenate(parts)
  return tokens, tok, meta


def load_books_corpus(data_cfg: Any, vocab_size: int) -> Corpus:
  """`data.data_type='books'`: a preprocessed folder, or raw books parsed now.

  Raises:
    ConfigError: missing path, vocabulary mismatch with `model.vocab_size`,
      a tokenizer_path that differs from the folder's vocabulary, or no text.
  """
  path = data_cfg.data_path
  if not path:
    raise ConfigError("data.data_path is required for data.data_type='books' (a folder of "
                      "books or the output of python -m hope_jax.preprocess_books)")
  if not os.path.exists(path):
    raise ConfigError(f"data.data_path: no such file or directory: {path}")
  folder = path
  if os.path.isfile(path) and os.path.basename(path) in ("metadata.json", "corpus.jsonl",
                                                          "tokens.bin"):
    folder = os.path.dirname(path) or "."
  if os.path.isdir(folder) and is_preprocessed(folder):
    tokens, tok, meta = load_preprocessed_tokens(folder)
    if data_cfg.tokenizer_path:
      other = CharTokenizer.load(data_cfg.tokenizer_path)
      if other.itos != tok.itos:
        raise ConfigError(
            f"data.tokenizer_path {data_cfg.tokenizer_path} is not the vocabulary {folder} was "
            "tokenized with; leave data.tokenizer_path unset (the folder's vocab.json is used) "
            "or re-run preprocess_books with --vocab=" + str(data_cfg.tokenizer_path))
    check_vocab(tok, vocab_size)
    desc = f"{meta['books_read']} preprocessed book(s) from {folder} ({len(tokens):,} tokens)"
  else:
    tokens, tok, desc = _parse_raw_books(path, data_cfg, vocab_size)
  train, val = split(tokens, data_cfg.val_fraction, data_cfg.seq_len)
  return Corpus(train=train, val=val, tokenizer=tok, description=desc)


def _parse_raw_books(path: str, data_cfg: Any, vocab_size: int):
  # A byte tokenizer or a given vocabulary has a known size: check it before
  # parsing (OCR can take hours); a vocabulary built from the books waits.
  fixed_tok = None
  if data_cfg.tokenizer == "byte" or data_cfg.tokenizer_path:
    fixed_tok = _tokenizer_for(data_cfg)
    check_vocab(fixed_tok, vocab_size)
  options = ReadOptions(enable_ocr=bool(data_cfg.enable_ocr), ocr_lang=data_cfg.ocr_lang)
  if options.enable_ocr:
    from hope_jax.data.readers import ocr

    ocr.check_available(options.ocr_lang)
  if os.path.isfile(path):
    root, books = os.path.dirname(path) or ".", [os.path.basename(path)]
  else:
    root, (books, _) = path, find_books(path)
  texts, skipped = [], []
  for rel, doc, reason in iter_documents(root, books, options):
    if doc is None:
      skipped.append(f"{rel}: {reason}")
      logging.warning("skipped book %s: %s", rel, reason)
    else:
      texts.append(doc.render(bool(data_cfg.preserve_structure)))
  if not texts:
    raise ConfigError(f"data.data_path: no usable books in {path} ({len(books)} found"
                      + (f"; skipped: {'; '.join(skipped[:5])}" if skipped else "") + ")")
  tok = fixed_tok or _tokenizer_for(data_cfg, texts + [DOC_SEPARATOR])
  check_vocab(tok, vocab_size)
  sep = tok.encode(DOC_SEPARATOR)
  tokens = np.concatenate([part for t in texts for part in (tok.encode(t), sep)])
  desc = f"{len(texts)} book(s) parsed from {path}" + (
      f", {len(skipped)} skipped" if skipped else "")
  return tokens.astype(token_store.dtype_for(tok.vocab_size)), tok, desc
