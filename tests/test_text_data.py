"""Text corpora and tokenizers: encodings, streaming, memmap cache, vocab checks."""

import os

import numpy as np
import pytest
from ml_collections import config_dict

from hope_jax.config import ConfigError
from hope_jax.data import load_corpus, text_corpus, token_store
from hope_jax.data.readers.text import iter_text_chunks, read_text_file
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
