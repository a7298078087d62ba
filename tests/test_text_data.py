"""Text corpora and tokenizers: encodings, streaming, memmap cache, vocab checks."""

import codecs
import json
import os

import numpy as np
import pytest
from ml_collections import config_dict

from hope_jax.config import ConfigError
from hope_jax.data import load_corpus, text_corpus, token_store
from hope_jax.data.corpus import text_files
from hope_jax.data.readers.text import is_binary_file, iter_text_chunks, read_text_file
from hope_jax.data.sampler import BatchSampler
from hope_jax.data.tokenizers import ByteTokenizer, CharTokenizer

MIXED = "Hello, wörld! 天下大势 吾輩は猫である。 한국어 Ελληνικά 🐋\r\nline two\n"


def _cfg(path, **kw):
  cfg = config_dict.ConfigDict(dict(
      data_type="text", data_path=str(path), tokenizer_path=None, tokenizer="char", seq_len=8,
      val_fraction=0.1, memmap_min_mb=64.0, cache_dir=None))
  cfg.update(kw)
  return cfg


def test_char_encode_matches_reference_twin_and_round_trips():
  tok = CharTokenizer.build([MIXED])
  for text in (MIXED, "", "unseen: ж ♞ \ud800 x", MIXED * 3):
    np.testing.assert_array_equal(tok.encode(text), tok.encode_reference(text))
  assert tok.decode(tok.encode(MIXED)) == MIXED
  ids = tok.encode("ж")
  assert ids.tolist() == [1] and tok.decode(ids) == "\ufffd"  # UNK.


def test_vocab_file_round_trip_and_rejects_non_vocabularies(tmp_path):
  tok = CharTokenizer.build(["天下大势 abc"])
  tok.save(tmp_path / "vocab.json")
  assert CharTokenizer.load(str(tmp_path / "vocab.json")).itos == tok.itos
  bad = {"plain.json": '{"a": 1}', "broken.json": "{not json", "list.json": "[1, 2]",
         "dup.json": '{"format": "hope_jax.char_vocab.v1", "tokens": ["<pad>", "<unk>", "a", "a"]}'}
  for name, content in bad.items():
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=f"{name} is not a"):
      CharTokenizer.load(str(tmp_path / name))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "cp1252", "gb18030",
                                      "shift_jis"])
def test_text_files_in_common_encodings(tmp_path, encoding):
  text = {"cp1252": "Le café était très agréable, près de la forêt. Où êtes-vous ?\n",
          "gb18030": "天下大势，分久必合，合久必分。周末七国分争，并入于秦。\n",
          "shift_jis": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。\n"
          }.get(encoding, MIXED.replace("\r\n", "\n"))
  path = tmp_path / "t.txt"
  path.write_bytes(text.encode(encoding))
  assert read_text_file(str(path)) == text
  # Streaming in tiny chunks splits multibyte characters and "\r\n"; same text.
  assert "".join(iter_text_chunks(str(path), chunk_bytes=3)) == text


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("text", ["Plain ASCII text, twice as wide.\n" * 20,
                                  "Le café était très agréable, près de la forêt.\n" * 20])
def test_utf16_without_a_byte_order_mark_is_text(tmp_path, encoding, text):
  # Some Windows tools write UTF-16 without a BOM. Its ASCII is valid UTF-8 too, with a NUL
  # character after every letter, which made such a file "binary".
  path = tmp_path / "t.txt"
  path.write_bytes(text.encode(encoding))
  assert not is_binary_file(str(path))
  assert read_text_file(str(path)) == text
  assert "".join(iter_text_chunks(str(path), chunk_bytes=3)) == text
  # Two-byte numbers with NUL high bytes are no such text: control characters, still binary.
  (tmp_path / "n.txt").write_bytes((np.arange(1000, dtype="<u2") % 50).astype("<u2").tobytes())
  assert is_binary_file(str(tmp_path / "n.txt"))


RUSSIAN = (
    "Вечером мы вышли из дома и долго шли вдоль реки. Над водой поднимался туман, и старые "
    "липы у набережной казались серыми тенями. Брат рассказывал о своей новой работе: он "
    "чинил часы в маленькой мастерской на углу Садовой улицы, и хозяин, строгий седой "
    "старик, уже доверял ему самые дорогие заказы. Я слушала и думала о том, что осенью нам "
    "придётся уехать, а город останется таким же тихим и задумчивым, как сегодня.\n")
GREEK = (
    "Το πρωί ξυπνήσαμε νωρίς και κατεβήκαμε στο λιμάνι. Οι ψαράδες είχαν ήδη γυρίσει από τη "
    "θάλασσα και άπλωναν τα δίχτυα τους στον ήλιο. Η γιαγιά μου αγόρασε δύο μεγάλα ψάρια και "
    "μου είπε να τα κρατήσω προσεκτικά μέχρι το σπίτι. Στον δρόμο συναντήσαμε τον δάσκαλο "
    "του χωριού, που μας ρώτησε πότε θα έρθει ο πατέρας μου από την Αθήνα.\n")


@pytest.mark.parametrize("text,encoding", [(RUSSIAN, "cp1251"), (RUSSIAN, "iso8859_5"),
                                           (GREEK, "cp1253")])
def test_non_latin_single_byte_pages_are_not_read_as_cp1252(tmp_path, text, encoding):
  # Only Latin-script pages give way to cp1252; Cyrillic or Greek bytes would become mojibake.
  path = tmp_path / "t.txt"
  path.write_bytes(text.encode(encoding))
  assert read_text_file(str(path)) == text
  assert "".join(iter_text_chunks(str(path), chunk_bytes=3)) == text


def test_crlf_split_across_chunks(tmp_path):
  path = tmp_path / "crlf.txt"
  path.write_bytes(b"ab\r\ncd\r\n\r\nef\r")
  for chunk in (1, 2, 3, 4, 100):
    assert "".join(iter_text_chunks(str(path), chunk_bytes=chunk)) == "ab\ncd\n\nef\n"


def test_large_text_corpus_is_memmapped_and_matches_in_memory(tmp_path):
  data = tmp_path / "data"
  (data / "sub").mkdir(parents=True)
  (data / "a.txt").write_text(MIXED * 20, encoding="utf-8")
  (data / "sub" / "b.txt").write_bytes(("Zoë à la forêt. " * 30).encode("cp1252"))
  small = load_corpus(_cfg(data), _vocab_size(data))
  big = load_corpus(_cfg(data, memmap_min_mb=0.0), small.tokenizer.vocab_size)
  assert isinstance(big.train, np.memmap) and not isinstance(small.train, np.memmap)
  assert big.tokenizer.itos == small.tokenizer.itos  # Streamed vocabulary == in-memory one.
  np.testing.assert_array_equal(big.train, small.train)
  np.testing.assert_array_equal(big.val, small.val)
  cache = data / ".hope_jax_cache"
  bins = sorted(cache.glob("*.tokens.bin"))
  assert len(bins) == 1
  stamp = bins[0].stat().st_mtime_ns
  again = load_corpus(_cfg(data, memmap_min_mb=0.0), small.tokenizer.vocab_size)
  assert bins[0].stat().st_mtime_ns == stamp  # Reused, not re-encoded.
  np.testing.assert_array_equal(again.train, big.train)
  # Batches from the memmap equal batches from RAM, step by step (exact resume).
  s1, s2 = BatchSampler(big.train, 3, 8, seed=1), BatchSampler(np.array(small.train), 3, 8, seed=1)
  for step in (0, 1, 17, 100):
    np.testing.assert_array_equal(s1.batch(step), s2.batch(step))
  assert s1.state(7) == s2.state(7)
  # An edited corpus gets a new cache entry.
  (data / "a.txt").write_text(MIXED * 21, encoding="utf-8")
  load_corpus(_cfg(data, memmap_min_mb=0.0), small.tokenizer.vocab_size)
  assert len(sorted(cache.glob("*.tokens.bin"))) == 2


def _vocab_size(data):
  texts = [read_text_file(str(p)) for p in sorted(data.rglob("*.txt"))]
  return CharTokenizer.build(texts + ["\n\n"]).vocab_size


def test_byte_tokenizer_memmap_and_vocab_mismatch(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text(MIXED * 10, encoding="utf-8")
  corpus = load_corpus(_cfg(path, tokenizer="byte", memmap_min_mb=0.0,
                            cache_dir=str(tmp_path / "c")), 256)
  assert corpus.train.dtype == np.uint8 and isinstance(corpus.train, np.memmap)
  ids = np.concatenate([corpus.train, corpus.val])
  assert ByteTokenizer().decode(ids) == MIXED.replace("\r\n", "\n") * 10 + "\n\n"
  with pytest.raises(ConfigError, match=r"tokenizer has 256 tokens but model.vocab_size is 300; "
                     r"set --config.model.vocab_size=256"):
    load_corpus(_cfg(path, tokenizer="byte"), 300)
  with pytest.raises(ConfigError, match="one.txt is not a .*vocabulary"):
    load_corpus(_cfg(path, tokenizer_path=str(path)), 256)  # A text file is not a vocab.


def test_token_store_detects_truncation(tmp_path):
  path = str(tmp_path / "t.tokens.bin")
  with token_store.TokenWriter(path, 70000) as w:
    w.write(np.array([1, 69999, 5]))
  assert token_store.open_tokens(path, "uint32", 3).tolist() == [1, 69999, 5]
  with pytest.raises(ConfigError, match="truncated or stale"):
    token_store.open_tokens(path, "uint32", 4)
  with pytest.raises(ValueError, match="out of range"):
    with token_store.TokenWriter(str(tmp_path / "u.tokens.bin"), 10) as w:
      w.write(np.array([10]))
  assert not os.path.exists(tmp_path / "u.tokens.bin")
  assert not os.path.exists(tmp_path / "u.tokens.bin.partial")
  assert text_corpus.cache_dir_for(str(tmp_path), None).endswith(".hope_jax_cache")


def test_eval_batches_from_a_split_shorter_than_one_batch():
  from hope_jax.data.sampler import eval_batches

  tokens = np.arange(3 * 9 + 1, dtype=np.uint16)  # 3 windows of seq_len 8, batch of 4.
  batches = list(eval_batches(tokens, 4, 8, 2))
  assert len(batches) == 1 and batches[0].shape == (4, 9)
  np.testing.assert_array_equal(batches[0][:3], tokens[:27].reshape(3, 9))
  np.testing.assert_array_equal(batches[0][3], batches[0][0])


def test_token_writers_racing_for_one_path_both_succeed(tmp_path):
  path = str(tmp_path / "t.tokens.bin")
  (tmp_path / "t.tokens.bin.partial").write_bytes(b"stale, from a crashed writer")
  first, second = token_store.TokenWriter(path, 256), token_store.TokenWriter(path, 256)
  first.write(np.arange(10))
  second.write(np.arange(10))  # A shared temp file would be truncated here.
  first.write(np.arange(10, 20))
  second.write(np.arange(10, 20))
  assert first.close() == second.close() == 20  # The loser's rename is not an error.
  assert token_store.open_tokens(path, "uint8", 20).tolist() == list(range(20))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tokens.bin", "t.tokens.bin.partial"]


def test_two_runs_building_one_cache_at_once(tmp_path, monkeypatch):
  import threading

  path = tmp_path / "one.txt"
  path.write_text(MIXED * 10, encoding="utf-8")
  both_writing = threading.Barrier(2, timeout=20)

  def chunks_once_both_are_writing(*args, **kw):
    both_writing.wait()  # Each run has opened its token file by now.
    yield from iter_text_chunks(*args, **kw)

  monkeypatch.setattr(text_corpus, "iter_text_chunks", chunks_once_both_are_writing)
  cfg = _cfg(path, tokenizer="byte", memmap_min_mb=0.0, cache_dir=str(tmp_path / "c"))
  results, errors = [], []

  def run():
    try:
      corpus = load_corpus(cfg, 256)
      results.append(np.concatenate([corpus.train, corpus.val]))
    except Exception as e:  # noqa: BLE001  (reported by the assertion below)
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 2
  np.testing.assert_array_equal(results[0], results[1])
  assert not list((tmp_path / "c").glob("*partial*"))


def test_cache_record_and_vocab_are_renamed_into_place(tmp_path, monkeypatch):
  path = tmp_path / "one.txt"
  path.write_text(MIXED * 10, encoding="utf-8")
  replaced, replace = [], os.replace
  monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(dst), replace(src, dst)))
  vocab = CharTokenizer.build([MIXED.replace("\r\n", "\n"), "\n\n"]).vocab_size
  load_corpus(_cfg(path, memmap_min_mb=0.0, cache_dir=str(tmp_path / "c")), vocab)
  assert sorted(os.path.basename(p).split(".", 1)[1] for p in replaced) == [
      "json", "tokens.bin", "vocab.json"]
  assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
      os.path.basename(p) for p in replaced)


def _cut_short(record):
  record.write_bytes(record.read_bytes()[:25])


def _without_dtype(record):
  rec = json.loads(record.read_text(encoding="utf-8"))
  del rec["dtype"]
  record.write_text(json.dumps(rec), encoding="utf-8")


def _dtype_foo(record):
  rec = json.loads(record.read_text(encoding="utf-8"))
  record.write_text(json.dumps({**rec, "dtype": "foo"}), encoding="utf-8")


def _cached_corpus(tmp_path):
  """(config, vocab size, corpus) of a small text corpus loaded through the token cache."""
  path = tmp_path / "one.txt"
  path.write_text(MIXED * 10, encoding="utf-8")
  cfg = _cfg(path, memmap_min_mb=0.0, cache_dir=str(tmp_path / "c"))
  vocab = CharTokenizer.build([MIXED.replace("\r\n", "\n"), "\n\n"]).vocab_size
  return cfg, vocab, load_corpus(cfg, vocab)


@pytest.mark.parametrize("damage,problem", [
    (_cut_short, "Unterminated string"), (_without_dtype, "missing key 'dtype'"),
    (_dtype_foo, "unsupported token dtype 'foo'")])
def test_damaged_cache_record_is_stale_and_rewritten(tmp_path, caplog, damage, problem):
  cfg, vocab, first = _cached_corpus(tmp_path)
  (record,) = (tmp_path / "c").glob("text-*-*.json")
  good = json.loads(record.read_text(encoding="utf-8"))
  damage(record)
  with caplog.at_level("WARNING"):
    again = load_corpus(cfg, vocab)
  assert f"token cache {record} is unusable (" in caplog.text and problem in caplog.text
  assert isinstance(again.train, np.memmap)
  np.testing.assert_array_equal(again.train, first.train)
  np.testing.assert_array_equal(again.val, first.val)
  assert json.loads(record.read_text(encoding="utf-8")) == good


def test_damaged_cached_vocabulary_is_counted_again(tmp_path, caplog):
  cfg, vocab, first = _cached_corpus(tmp_path)
  (vocab_file,) = (tmp_path / "c").glob("*.vocab.json")
  vocab_file.write_text("{not json", encoding="utf-8")
  with caplog.at_level("WARNING"):
    again = load_corpus(cfg, vocab)
  assert f"{vocab_file} is not a vocabulary file" in caplog.text
  assert "data.tokenizer_path" not in caplog.text
  assert again.tokenizer.itos == first.tokenizer.itos
  np.testing.assert_array_equal(again.train, first.train)
  assert CharTokenizer.load(str(vocab_file)).itos == first.tokenizer.itos


def test_streamed_file_whose_head_is_ascii_is_not_read_as_utf8(tmp_path, monkeypatch):
  from hope_jax.data.readers import text

  monkeypatch.setattr(text, "SAMPLE_BYTES", 64)
  path = tmp_path / "latin.txt"
  latin = "Zoë à la forêt, très agréable.\n".encode("cp1252")
  path.write_bytes(b"plain ascii\r\n" * 20 + latin)  # Past the (shrunk) detection window.
  expected = read_text_file(str(path))
  assert "forêt" in expected
  for chunk in (7, 50, 1000):
    assert "".join(iter_text_chunks(str(path), chunk_bytes=chunk)) == expected
  # Bytes no encoding explains stay U+FFFD, as in memory, instead of looping.
  path.write_bytes(codecs.BOM_UTF8 + b"x" * 100 + b"\xff\xfe ok\n")
  assert "".join(iter_text_chunks(str(path), chunk_bytes=16)) == read_text_file(str(path))


def test_unwritable_cache_is_one_config_error_before_counting(tmp_path, monkeypatch):
  path = tmp_path / "one.txt"
  path.write_text(MIXED * 10, encoding="utf-8")

  def no_counting(*_, **__):
    raise AssertionError("counted the corpus before checking the cache folder")

  monkeypatch.setattr(text_corpus, "iter_text_chunks", no_counting)
  under_a_file = str(path / "cache")  # Root cannot create a folder there either.
  with pytest.raises(ConfigError, match=r"data.cache_dir: cannot write to .*one.txt/cache .*"
                     r"set --config.data.cache_dir to a writable folder"):
    load_corpus(_cfg(path, memmap_min_mb=0.0, cache_dir=under_a_file), 100)
  if os.path.isdir("/proc/self"):  # An existing folder that root cannot write to either.
    for tokenizer in ("char", "byte"):
      with pytest.raises(ConfigError, match="data.cache_dir: cannot write to /proc/self"):
        load_corpus(_cfg(path, tokenizer=tokenizer, memmap_min_mb=0.0, cache_dir="/proc/self"),
                    256)


def test_text_folder_links_and_binary_files(tmp_path, caplog):
  data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
  (data / "sub").mkdir(parents=True)
  elsewhere.mkdir()
  (data / "a.txt").write_text("hello\n")
  (data / "sub" / "b.txt").write_bytes("wide text\n".encode("utf-16"))  # NUL bytes, not chars.
  (elsewhere / "c.txt").write_text("linked\n")
  (data / "linked").symlink_to(elsewhere, target_is_directory=True)
  (data / "sub" / "loop").symlink_to(data, target_is_directory=True)
  (data / "gone.txt").symlink_to(tmp_path / "missing.txt")
  (data / "blob.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 10)
  with caplog.at_level("WARNING"):
    files = text_files(str(data))
  assert files == [str(data / "a.txt"), str(data / "linked" / "c.txt"), str(data / "sub" / "b.txt")]
  assert "gone.txt: broken link" in caplog.text and "blob.txt: not a text file" in caplog.text
  corpus = load_corpus(_cfg(data, tokenizer="byte", seq_len=2), 256)
  assert "linked" in ByteTokenizer().decode(np.concatenate([corpus.train, corpus.val]))
  only_binary = tmp_path / "bin"
  only_binary.mkdir()
  (only_binary / "x.txt").write_bytes(b"\x00" * 64)
  with pytest.raises(ConfigError, match=r"no .txt files in .*bin \(skipped: x.txt: not a text"):
    text_files(str(only_binary))
  with pytest.raises(ConfigError, match="x.txt is not a text file"):
    text_files(str(only_binary / "x.txt"))


def test_text_folders_skip_preprocessed_book_corpora(tmp_path):
  # An earlier preprocess_books output inside the data folder holds copies of its books
  # (text/*.txt): read as text they would count every book twice.
  import json

  from hope_jax.data.corpus import BOOKS_FORMAT, text_files

  (tmp_path / "a.txt").write_text("a book")
  out = tmp_path / "corpus"
  (out / "text").mkdir(parents=True)
  (out / "text" / "a.txt.txt").write_text("a book")
  (out / "metadata.json").write_text(json.dumps({"format": BOOKS_FORMAT}))
  assert text_files(str(tmp_path)) == [str(tmp_path / "a.txt")]
  (out / "metadata.json").write_text(json.dumps({"format": "something else"}))
  assert len(text_files(str(tmp_path))) == 2


def test_utf16_without_a_byte_order_mark_damaged_past_its_head_is_still_utf16(tmp_path):
  # An odd last byte, or a lone surrogate: U+FFFD there, not NUL characters everywhere.
  body = "Plain ASCII text, twice as wide.\n" * 4000
  for name, raw in (("odd.txt", body.encode("utf-16-le") + b"x"),
                    ("surrogate.txt", body.encode("utf-16-le") + b"\x00\xd8" + body.encode(
                        "utf-16-le"))):
    path = tmp_path / name
    path.write_bytes(raw)
    assert not is_binary_file(str(path))
    for text in (read_text_file(str(path)), "".join(iter_text_chunks(str(path)))):
      assert "\x00" not in text and text.startswith(body) and "\ufffd" in text
