"""Books: readers on real PDF/EPUB/TXT files, preprocess_books, data_type='books'."""

import json
import os
import shutil

import numpy as np
import pytest
from ml_collections import config_dict

from hope_jax.config import ConfigError
from hope_jax.data import books
from hope_jax.data.readers import (
  CHAPTER_MARKER,
  PARAGRAPH_MARKER,
  BookSkipped,
  ReadOptions,
  read_book,
)
from hope_jax.data.sampler import BatchSampler
from hope_jax.data.tokenizers import CharTokenizer
from tests import bookmaker
from tests.conftest import run_cli

HAVE_TESSERACT = shutil.which("tesseract") is not None and shutil.which("pdftoppm") is not None
CORPUS_KEYS = {"id", "source", "format", "title", "text_file", "pages", "ocr_pages", "chapters",
               "paragraphs", "num_chars", "encoding", "token_offset", "num_tokens", "text",
               "token_ids"}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  return bookmaker.make_library(str(tmp_path_factory.mktemp("books")))


@pytest.fixture(scope="module")
def preprocessed(library, tmp_path_factory):
  """The CLI run once with markers; (output folder, CompletedProcess)."""
  out = str(tmp_path_factory.mktemp("out"))
  proc = run_cli(["-m", "hope_jax.preprocess_books", f"--input={library}", f"--output={out}",
                  "--preserve_structure"])
  assert proc.returncode == 0, proc.stderr
  return out, proc


def _data_cfg(path, **kw):
  cfg = config_dict.ConfigDict(dict(
      data_type="books", data_path=path, tokenizer_path=None, tokenizer="byte", seq_len=16,
      val_fraction=0.1, preserve_structure=False, enable_ocr=False, ocr_lang="eng"))
  cfg.update(kw)
  return cfg


def test_pdf_text_layer_outline_chapters_and_paragraphs(library):
  doc = read_book(os.path.join(library, "moby.pdf"), ReadOptions())
  assert (doc.format, doc.title, doc.pages) == ("pdf", "Moby", 2)
  assert [c.title for c in doc.chapters] == ["Chapter 1: The Sea", "Chapter 2: The Sea"]
  # Wrapped lines are joined back into the paragraphs that were written.
  assert doc.chapters[1].paragraphs == [bookmaker.pdf_paragraph(2, i) for i in range(3)]
  plain = doc.render(preserve_structure=False)
  assert plain.startswith("Chapter 1: The Sea\n\n" + bookmaker.pdf_paragraph(1, 0) + "\n\n")
  assert CHAPTER_MARKER not in plain


def test_epub_chapters_inline_markup_and_markers(library):
  doc = read_book(os.path.join(library, "tale.epub"), ReadOptions())
  assert doc.title == "A Tale"
  assert doc.render(preserve_structure=True) == (
      f"{CHAPTER_MARKER} Chapter One\n{PARAGRAPH_MARKER} It was the best of times,\n"
      f"{PARAGRAPH_MARKER} it was the worst of times.\n"
      f"{CHAPTER_MARKER} Chapter Two\n{PARAGRAPH_MARKER} A tale of two cities.")


def test_chinese_epub_and_encoded_txt(library):
  zh = read_book(os.path.join(library, "chinese.epub"), ReadOptions())
  assert [(c.title, c.paragraphs) for c in zh.chapters] == bookmaker.CHINESE_CHAPTERS
  fr = read_book(os.path.join(library, "french.txt"), ReadOptions())
  assert fr.encoding == "cp1252"
  assert fr.render(False) == bookmaker.FRENCH
  assert [c.title for c in fr.chapters] == ["Chapter 1"]
  jp = read_book(os.path.join(library, "jp", "neko.txt"), ReadOptions())
  assert jp.render(False) == bookmaker.JAPANESE


@pytest.mark.parametrize("name, reason", [
    ("broken.pdf", "corrupt PDF"), ("empty.epub", "empty"), ("locked.pdf", "encrypted"),
    ("zero.txt", "empty file"), ("scan.pdf", "needs OCR")])
def test_bad_books_raise_skip_with_reason(library, name, reason):
  with pytest.raises(BookSkipped, match=reason):
    read_book(os.path.join(library, name), ReadOptions(enable_ocr=False))


def test_preprocess_cli_outputs(library, preprocessed):
  out, proc = preprocessed
  meta = json.load(open(os.path.join(out, "metadata.json"), encoding="utf-8"))
  assert (meta["books_found"], meta["books_read"], meta["books_skipped"]) == (10, 5, 5)
  assert {s["file"]: s["reason"].split(" ")[0] for s in meta["skipped"]} == {
      "broken.pdf": "corrupt", "empty.epub": "empty:", "locked.pdf": "encrypted",
      "scan.pdf": "needs", "zero.txt": "empty"}
  assert meta["ignored_files"] == ["notes.md"] and meta["pages"] == 2
  assert meta["markers"] == {"chapter": CHAPTER_MARKER, "paragraph": PARAGRAPH_MARKER}
  for name in ("broken.pdf", "locked.pdf", "scan.pdf"):  # Warnings name file and reason.
    assert f"skipped {name}:" in proc.stderr
  assert f"--config.model.vocab_size={meta['vocab_size']}" in proc.stdout

  tok = CharTokenizer.load(os.path.join(out, "vocab.json"))
  assert tok.vocab_size == meta["vocab_size"] and tok.itos[:2] == ["<pad>", "<unk>"]
  assert {"风", "猫", "é"} <= set(tok.itos)
  tokens = np.fromfile(os.path.join(out, "tokens.bin"), dtype=meta["tokens_dtype"])
  assert len(tokens) == meta["num_tokens"]
  docs = [json.loads(line) for line in open(os.path.join(out, "corpus.jsonl"), encoding="utf-8")]
  assert [d["source"] for d in docs] == ["chinese.epub", "french.txt", os.path.join("jp", "neko.txt"),
                                         "moby.pdf", "tale.epub"]
  for d in docs:
    assert set(d) == CORPUS_KEYS
    assert tok.decode(d["token_ids"]) == d["text"]  # Ids round-trip to the text.
    assert d["num_chars"] == len(d["text"]) == d["num_tokens"]
    np.testing.assert_array_equal(tokens[d["token_offset"]:d["token_offset"] + d["num_tokens"]],
                                  d["token_ids"])
    assert open(os.path.join(out, d["text_file"]), encoding="utf-8").read() == d["text"]
    assert d["text"].startswith((CHAPTER_MARKER, PARAGRAPH_MARKER))
  assert meta["characters"] == sum(d["num_chars"] for d in docs)


def test_books_corpus_from_preprocessed_folder_is_memmapped(preprocessed):
  out, _ = preprocessed
  meta = json.load(open(os.path.join(out, "metadata.json")))
  with pytest.raises(ConfigError, match=rf"tokenizer has {meta['vocab_size']} tokens but "
                     rf"model.vocab_size is 256; set --config.model.vocab_size={meta['vocab_size']}"):
    books.load_books_corpus(_data_cfg(out), 256)
  corpus = books.load_books_corpus(_data_cfg(out), meta["vocab_size"])
  assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
  assert len(corpus.train) + len(corpus.val) == meta["num_tokens"]
  # The sampler reads windows from the memmap exactly as from RAM.
  in_ram = np.array(corpus.train)
  a, b = BatchSampler(corpus.train, 2, 16, seed=3), BatchSampler(in_ram, 2, 16, seed=3)
  for step in (0, 5, 40):
    np.testing.assert_array_equal(a.batch(step), b.batch(step))
  # Same folder via its vocab.json, or via a different vocabulary: refused.
  books.load_books_corpus(_data_cfg(out, tokenizer_path=os.path.join(out, "vocab.json")),
                          meta["vocab_size"])
  other = os.path.join(out, "other_vocab.json")
  CharTokenizer(["a", "b"]).save(other)
  with pytest.raises(ConfigError, match="is not the vocabulary"):
    books.load_books_corpus(_data_cfg(out, tokenizer_path=other), meta["vocab_size"])


def _drop_tokens_dtype(folder):
  path = os.path.join(folder, "metadata.json")
  meta = json.load(open(path, encoding="utf-8"))
  del meta["tokens_dtype"]
  json.dump(meta, open(path, "w", encoding="utf-8"))
  return "metadata.json lacks the key 'tokens_dtype'"


def _bad_corpus_line(folder):
  os.remove(os.path.join(folder, "tokens.bin"))  # So the ids come from corpus.jsonl.
  path = os.path.join(folder, "corpus.jsonl")
  lines = open(path, encoding="utf-8").readlines()
  lines[1] = lines[1][: len(lines[1]) // 2] + "\n"  # Cut short, as by a full disk.
  open(path, "w", encoding="utf-8").writelines(lines)
  return "corpus.jsonl: line 2 is not JSON"


def _no_vocab(folder):
  os.remove(os.path.join(folder, "vocab.json"))
  return "vocab.json is missing"


def _short_tokens(folder):
  path = os.path.join(folder, "tokens.bin")
  os.truncate(path, os.path.getsize(path) - 2)
  return "tokens.bin has"


@pytest.mark.parametrize("damage", [_drop_tokens_dtype, _bad_corpus_line, _no_vocab,
                                    _short_tokens])
def test_damaged_preprocessed_folder_is_one_clear_error(preprocessed, tmp_path, damage):
  folder = str(tmp_path / "corpus")
  shutil.copytree(preprocessed[0], folder)
  vocab_size = json.load(open(os.path.join(folder, "metadata.json")))["vocab_size"]
  whole = books.load_books_corpus(_data_cfg(folder), vocab_size)
  problem = damage(folder)
  with pytest.raises(ConfigError) as e:
    books.load_books_corpus(_data_cfg(folder), vocab_size)
  msg = str(e.value)
  assert msg.startswith("data.data_path: ") and os.path.join(folder, problem) in msg, msg
  assert msg.endswith("re-run python -m hope_jax.preprocess_books to rebuild it"), msg
  assert "tokenizer_path" not in msg
  if damage is _bad_corpus_line:  # Mended, the ids from corpus.jsonl equal tokens.bin's.
    lines = open(os.path.join(preprocessed[0], "corpus.jsonl"), encoding="utf-8").readlines()
    open(os.path.join(folder, "corpus.jsonl"), "w", encoding="utf-8").writelines(lines)
    mended = books.load_books_corpus(_data_cfg(folder), vocab_size)
    np.testing.assert_array_equal(mended.train, whole.train)


def test_books_corpus_from_raw_folder(library):
  corpus = books.load_books_corpus(_data_cfg(library), 256)  # Byte tokenizer.
  text = corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]))
  assert "天下大势" in text and "It was the best of times" in text
  with pytest.raises(ConfigError, match="no usable books"):
    books.load_books_corpus(_data_cfg(os.path.join(library, "broken.pdf")), 256)


def test_nothing_usable_is_an_error_with_metadata(library, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  shutil.copy(os.path.join(library, "broken.pdf"), src)
  with pytest.raises(ConfigError, match=r"no usable books .*broken.pdf: corrupt PDF"):
    books.preprocess(str(src), str(tmp_path / "out"), warn=lambda _: None)
  meta = json.load(open(tmp_path / "out" / "metadata.json"))
  assert meta["books_skipped"] == 1 and meta["books_read"] == 0


def test_cli_bad_paths_are_one_line_errors(library, tmp_path):
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  cases = [
      ([f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'o'}"], "input folder does not exist"),
      ([f"--input={library}", f"--output={a_file}"], "is a file"),
      ([f"--input={library}", f"--output={tmp_path / 'o'}", f"--vocab={a_file}"],
       "is not a vocabulary"),
  ]
  for args, message in cases:
    proc = run_cli(["-m", "hope_jax.preprocess_books", *args])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.skipif(not HAVE_TESSERACT, reason="tesseract/pdftoppm not on PATH "
                    "(apt-get install tesseract-ocr poppler-utils)")
def test_ocr_of_image_only_pdf(library, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  shutil.copy(os.path.join(library, "scan.pdf"), src)
  meta = books.preprocess(str(src), str(tmp_path / "out"), options=ReadOptions(enable_ocr=True))
  assert (meta["books_read"], meta["ocr_pages"], meta["needs_ocr"]) == (1, 1, [])
  text = (tmp_path / "out" / "text" / "scan.pdf.txt").read_text()
  assert text.split() == " ".join(bookmaker.OCR_LINES).split(), text


@pytest.mark.skipif(not HAVE_TESSERACT, reason="tesseract/pdftoppm not on PATH")
def test_ocr_language_not_installed_names_the_setting_of_both_entry_points():
  from hope_jax.config import ConfigError
  from hope_jax.data.readers import ocr

  with pytest.raises(ConfigError) as err:
    ocr.check_available("eng+xx_none")
  message = str(err.value)
  assert "['xx_none'] are not installed" in message and "\n" not in message
  assert "preprocess_books --lang" in message and "data.ocr_lang" in message


def test_train_cli_on_preprocessed_books(preprocessed, tmp_path):
  out, _ = preprocessed
  vocab_size = json.load(open(os.path.join(out, "metadata.json")))["vocab_size"]
  base = ["-m", "hope_jax.train", "--config=experiments/tiny.py",
          "--config.data.data_type=books", f"--config.data.data_path={out}",
          "--config.training.num_steps=3", f"--config.training.checkpoint_dir={tmp_path}",
          "--config.training.progress_bar=False"]
  wrong = run_cli([*base, "--config.model.vocab_size=256"])
  assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
  assert (f"the tokenizer has {vocab_size} tokens but model.vocab_size is 256; "
          f"set --config.model.vocab_size={vocab_size}") in wrong.stderr
  proc = run_cli([*base, f"--config.model.vocab_size={vocab_size}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "preprocessed book(s)" in proc.stdout + proc.stderr
  rows = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
  assert max(r["step"] for r in rows) == 3
  assert all(np.isfinite(v) for r in rows for k, v in r.items() if "loss" in k)


def test_pdf_page_numbers_need_consecutive_neighbours(tmp_path):
  # Only one lone number at each end of a page is a candidate, and only when a
  # nearby page holds the matching number; words and years that end a page stay.
  pages = [["Preface.", "ix"], ["More preface.", "x"],
           ["The years were:", "1997", "1998", "1999", "2000"], ["Who said it? Not", "I"],
           ["Vivid words:", "did", "mix", "civil", "dim", "CD"], ["Page six.", "6"],
           ["Page seven.", "7"], ["Page eight.", "- 8 -"]]
  path = bookmaker.make_pdf_pages(str(tmp_path / "numbers.pdf"), pages)
  words = read_book(path, ReadOptions()).render(False).split()
  assert words == ("Preface. More preface. The years were: 1997 1998 1999 2000 Who said it? "
                   "Not I Vivid words: did mix civil dim CD Page six. Page seven. "
                   "Page eight.").split()


def test_epub_text_outside_innermost_blocks_is_kept(tmp_path):
  path = bookmaker.make_epub_bodies(str(tmp_path / "loose.epub"), [
      ("Loose", "<div>Loose text.<p>A paragraph.</p>More.</div>"),
      ("Body", "<h1>T</h1>Text in body.<br/>Second line.<!-- a comment -->"
               "<p>Para with <em>in</em>line.</p>"),
      ("Nested", "<section><h2>Inner</h2><div>One <b>bold</b> div.</div></section>")])
  doc = read_book(path, ReadOptions())
  assert [(c.title, c.paragraphs) for c in doc.chapters] == [
      ("Loose", ["Loose text.", "A paragraph.", "More."]),
      ("T", ["Text in body.", "Second line.", "Para with inline."]),
      ("Inner", ["One bold div."])]


def test_text_files_are_unique_and_fit_the_file_system(tmp_path):
  # `a/b.txt` and `a__b.txt` flatten to the same name; the Calibre-style CJK
  # path (3 bytes a character) flattens to far more than 255 bytes.
  deep = os.path.join("作者" * 40, "书名" * 40 + " (12)", "书名" * 30 + " - 作者.txt")
  texts = {os.path.join("a", "b.txt"): "Sub folder book.", "a__b.txt": "Root book.",
           deep: "Deep book."}
  for rel, text in texts.items():
    os.makedirs(os.path.dirname(tmp_path / "in" / rel), exist_ok=True)
    (tmp_path / "in" / rel).write_text(text, encoding="utf-8")
  out = tmp_path / "out"
  assert books.preprocess(str(tmp_path / "in"), str(out))["books_read"] == 3
  docs = [json.loads(line) for line in open(out / "corpus.jsonl", encoding="utf-8")]
  assert {d["source"]: d["text"] for d in docs} == texts
  assert len({d["text_file"] for d in docs}) == 3
  for d in docs:
    assert len(os.path.basename(d["text_file"]).encode()) <= 255
    assert (out / d["text_file"]).read_text(encoding="utf-8") == d["text"]
  assert os.path.join(books.TEXT_DIR, "a__b.txt.txt") in {d["text_file"] for d in docs}


def test_preprocessed_folders_inside_the_input_are_not_books(tmp_path):
  src = tmp_path / "lib"
  src.mkdir()
  (src / "one.txt").write_text("The first book.")
  (src / "two.txt").write_text("The second book.")
  notes = []
  books.preprocess(str(src), str(src / "corpus"), warn=notes.append)
  meta = books.preprocess(str(src), str(src / "corpus_v2"), warn=notes.append)
  assert (meta["books_found"], meta["books_read"]) == (2, 2)
  assert any("corpus" in n and books.META_FORMAT in n for n in notes), notes
  corpus = books.load_books_corpus(_data_cfg(str(src), seq_len=4), 256)
  assert corpus.description == f"2 book(s) parsed from {src}"
  with pytest.raises(ConfigError, match="already a preprocessed book corpus"):
    books.preprocess(str(src / "corpus"), str(tmp_path / "again"))


def test_vocab_errors_name_the_flag_and_come_before_parsing(library, tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match=r"^--vocab: no such file"):
    books.preprocess(library, str(tmp_path / "o"), vocab_path=str(tmp_path / "nope.json"))
  vocab = str(tmp_path / "vocab.json")
  CharTokenizer(["a", "b"]).save(vocab)

  def no_parsing(*args):
    raise AssertionError("books were parsed before the vocabulary check")

  monkeypatch.setattr(books, "iter_documents", no_parsing)
  for cfg, size in [(_data_cfg(library), 300),
                    (_data_cfg(library, tokenizer="char", tokenizer_path=vocab), 256)]:
    with pytest.raises(ConfigError, match="vocab size mismatch"):
      books.load_books_corpus(cfg, size)


def test_a_book_file_name_that_is_not_utf8_is_recorded(tmp_path):
  # Linux names are bytes: "caf\xe9.txt" (Latin-1) comes back from os.listdir as
  # "caf\udce9.txt", which writing corpus.jsonl in UTF-8 used to fail on, after parsing.
  src = tmp_path / "in"
  src.mkdir()
  with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as f:
    f.write(b"A small book about coffee.\n" * 20)
  meta = books.preprocess(str(src), str(tmp_path / "out"), warn=lambda _: None)
  assert meta["books_read"] == 1
  with open(tmp_path / "out" / "corpus.jsonl", encoding="utf-8") as f:
    (row,) = [json.loads(line) for line in f]
  assert row["source"] == "caf\udce9.txt" and row["text"].startswith("A small book")
  json.load(open(tmp_path / "out" / "metadata.json", encoding="utf-8"))


def test_a_file_named_pdf_that_is_no_pdf_says_so(tmp_path):
  # A web page saved as .pdf used to be reported as a corrupt PDF by the parser's first error.
  path = tmp_path / "page.pdf"
  path.write_text("<!DOCTYPE html><html><body><p>Not a book.</p></body></html>")
  with pytest.raises(BookSkipped, match=r"not a PDF \(no %PDF- header"):
    read_book(str(path), ReadOptions())
