r"""Book preprocessing speed and the memory of training from a large memory-mapped corpus.

Run (from the repository root; ~2-3 minutes with the defaults on 2 CPU cores):
  python benchmarks/books_preprocess.py [--corpus_mb=200] [--pdf_pages=40] [--ocr_pages=4] \
      [--train_steps=20] [--json=bench_books.json]

Measures:
  File-backed pages of the memmap count in RSS but are page cache, shared and dropped under
  memory pressure; the memory the process itself holds is the anonymous part.
  1. pages/s of preprocess_books on a generated text PDF (pypdf text layer);
  2. pages/s with OCR on generated image-only pages (Tesseract; skipped if not installed);
  3. a generated `corpus_mb` text corpus through `data_type='text'` with the memmap cache:
     encode time and peak RSS of the first (encoding) load, peak RSS while streaming
     `stream_steps` batches from the memmap, and peak RSS of `python -m hope_jax.train`
     (tiny model) for `train_steps` steps on it. Each runs in its own process, so its
     peak RSS (ru_maxrss) is its own.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_MB = flags.DEFINE_integer("corpus_mb", 200, "Size of the generated text corpus (MiB).")
_PAGES = flags.DEFINE_integer("pdf_pages", 40, "Chapters (about one page each) of the text PDF.")
_OCR = flags.DEFINE_integer("ocr_pages", 4, "Image-only pages to OCR (0: skip).")
_STREAM = flags.DEFINE_integer("stream_steps", 2000, "Batches streamed from the memmap.")
_TRAIN = flags.DEFINE_integer("train_steps", 20, "Training steps on the large corpus (0: skip).")
_JSON = flags.DEFINE_string("json", None, "Where to write the results as JSON.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (default: a temporary one).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one measured phase.")

WORDS = ("the whale sea ship captain harpoon storm wave deck sail rope night moon star cold grey "
         "water silence sailor ocean deep white island harbour wind voyage compass map").split()


def _peak_rss_of(cmd: list[str], env=None) -> tuple[float, dict, str]:
  """Runs `cmd`; returns (seconds, peak memory in MiB, output).

  Peaks: `rss` (ru_maxrss, everything mapped), and, sampled every 20 ms from
  /proc, `anon` (private memory the process allocated) and `file` (file pages
  mapped, e.g. the token memmap: page cache the kernel can drop at any time).
  """
  t0 = time.perf_counter()
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=env)
    peak = {"anon": 0.0, "file": 0.0}
    while True:
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          for line in f:
            for key, tag in (("anon", "RssAnon:"), ("file", "RssFile:")):
              if line.startswith(tag):
                peak[key] = max(peak[key], int(line.split()[1]) / 1024)
      except OSError:
        pass
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      time.sleep(0.02)
    log.seek(0)
    out = log.read()
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f"{cmd} failed:\n{out[-3000:]}")
  peak["rss"] = usage.ru_maxrss / 1024
  return time.perf_counter() - t0, peak, out


def _fmt(peak: dict) -> str:
  return f"peak RSS {peak['rss']:.0f} MiB (anon {peak['anon']:.0f}, file-backed {peak['file']:.0f})"


def make_corpus(path: str, mib: int) -> None:
  import numpy as np

  rng = np.random.default_rng(0)
  words = np.array(WORDS)
  with open(path, "w", encoding="utf-8") as f:
    written = 0
    while written < mib << 20:
      idx = rng.integers(0, len(words), 1 << 20)
      block = " ".join(words[idx].tolist()) + ".\n"
      f.write(block)
      written += len(block)


def _child(phase: str, corpus: str) -> None:
  """One measured phase in a fresh process."""
  from ml_collections import config_dict

  from hope_jax.data import load_corpus
  from hope_jax.data.sampler import BatchSampler

  if phase == "import":  # Baseline: the interpreter with hope_jax.data imported.
    print(json.dumps({}))
    return
  cfg = config_dict.ConfigDict(dict(
      data_type="text", data_path=corpus, tokenizer="byte", tokenizer_path=None, seq_len=256,
      val_fraction=0.01, memmap_min_mb=0.0, cache_dir=None))
  t0 = time.perf_counter()
  c = load_corpus(cfg, 256)
  load_s = time.perf_counter() - t0
  if phase == "stream":
    sampler = BatchSampler(c.train, 16, 256, seed=0)
    t0 = time.perf_counter()
    for step in range(_STREAM.value):
      sampler.batch(step)
    print(json.dumps({"load_s": load_s, "batches_per_s": _STREAM.value / (time.perf_counter() - t0),
                      "tokens": int(len(c.train) + len(c.val))}))
  else:
    print(json.dumps({"load_s": load_s, "tokens": int(len(c.train) + len(c.val))}))


def main(argv):
  del argv
  if _CHILD.value:
    phase, corpus = _CHILD.value.split(":", 1)
    return _child(phase, corpus)
  from hope_jax.data import books
  from hope_jax.data.readers import ReadOptions
  from tests import bookmaker

  work = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_books_")
  rows, res = [], {"corpus_mb": _MB.value}

  pdf_in = os.path.join(work, "pdf_in")
  os.makedirs(pdf_in, exist_ok=True)
  bookmaker.make_text_pdf(os.path.join(pdf_in, "long.pdf"), chapters=_PAGES.value, paragraphs=6)
  t0 = time.perf_counter()
  meta = books.preprocess(pdf_in, os.path.join(work, "pdf_out"))
  dt = time.perf_counter() - t0
  res["text_pdf"] = {"pages": meta["pages"], "seconds": dt, "pages_per_s": meta["pages"] / dt}
  rows.append(("preprocess text PDF", f"{meta['pages']} pages", f"{meta['pages'] / dt:.1f} pages/s"))

  if _OCR.value:
    from hope_jax.config import ConfigError
    from hope_jax.data.readers import ocr

    try:
      ocr.check_available("eng")
      ocr_in = os.path.join(work, "ocr_in")
      os.makedirs(ocr_in, exist_ok=True)
      text_lines = [(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(6))).upper()
                    for i in range(30)]
      for p in range(_OCR.value):
        bookmaker.make_scanned_pdf(os.path.join(ocr_in, f"scan{p}.pdf"), text_lines)
      t0 = time.perf_counter()
      meta = books.preprocess(ocr_in, os.path.join(work, "ocr_out"),
                              options=ReadOptions(enable_ocr=True))
      dt = time.perf_counter() - t0
      res["ocr"] = {"pages": meta["ocr_pages"], "seconds": dt, "pages_per_s": meta["ocr_pages"] / dt,
                    "page": "140x282 mm, 30 lines, 300 dpi"}
      rows.append(("preprocess with OCR (300 dpi, 30-line page)", f"{meta['ocr_pages']} pages",
                   f"{meta['ocr_pages'] / dt:.2f} pages/s"))
    except ConfigError as e:
      rows.append(("preprocess with OCR", "skipped", str(e)[:60]))

  corpus = os.path.join(work, "large", "corpus.txt")
  os.makedirs(os.path.dirname(corpus), exist_ok=True)
  t0 = time.perf_counter()
  make_corpus(corpus, _MB.value)
  size_mib = os.path.getsize(corpus) / 2**20
  res["generate_s"] = time.perf_counter() - t0
  me = [sys.executable, os.path.abspath(__file__)]
  _, base_rss, _ = _peak_rss_of([*me, f"--child=import:{corpus}"])
  res["baseline_peak_mib"] = base_rss
  rows.append(("baseline: Python + hope_jax.data imported", "", _fmt(base_rss)))
  dt, rss, out = _peak_rss_of([*me, f"--child=encode:{corpus}"])
  enc = json.loads(out.strip().splitlines()[-1])
  res["encode"] = {"seconds": enc["load_s"], "peak_mib": rss, "tokens": enc["tokens"],
                   "mib_per_s": size_mib / enc["load_s"]}
  rows.append((f"encode {size_mib:.0f} MiB text into the memmap cache", f"{enc['load_s']:.1f} s",
               _fmt(rss)))
  dt, rss, out = _peak_rss_of([*me, f"--child=stream:{corpus}"])
  st = json.loads(out.strip().splitlines()[-1])
  res["stream"] = {"batches": _STREAM.value, "batches_per_s": st["batches_per_s"],
                   "peak_mib": rss, "load_s": st["load_s"]}
  rows.append((f"stream {_STREAM.value} batches [16, 257] from the memmap",
               f"{st['batches_per_s']:.0f} batches/s", _fmt(rss)))
  if _TRAIN.value:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    dt, rss, _ = _peak_rss_of([
        sys.executable, "-m", "hope_jax.train", "--config=experiments/tiny.py",
        "--config.data.data_type=text", f"--config.data.data_path={corpus}",
        "--config.data.memmap_min_mb=0", "--config.data.val_fraction=0.01",
        f"--config.training.num_steps={_TRAIN.value}", "--config.training.progress_bar=False",
        f"--config.training.checkpoint_dir={os.path.join(work, 'ckpt')}"], env=env)
    res["train"] = {"steps": _TRAIN.value, "seconds": dt, "peak_mib": rss}
    rows.append((f"python -m hope_jax.train (tiny, {_TRAIN.value} steps) on it", f"{dt:.1f} s",
                 _fmt(rss)))
  print(f"\n| measurement ({size_mib:.0f} MiB corpus) | size / time | result |\n|---|---|---|")
  for r in rows:
    print("| " + " | ".join(r) + " |")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(res, f, indent=2)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  app.run(main)
