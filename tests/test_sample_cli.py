"""hope_jax.sample with the run's own tokenizer; bad flags of sample/export/evaluate refused early.

The commands' `main` runs in-process on a real (untrained) books checkpoint, with
`absl.flags.FLAGS` replaced by a namespace: no subprocess, and each bad-flag case
fails before anything is compiled (before the checks, these cases compiled and
then failed or succeeded with junk).
"""

import os
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from absl import flags

from experiments import tiny
from hope_jax import checkpoint, evaluate, export, sample
from hope_jax.checkpoint import CheckpointManager
from hope_jax.config import ConfigError, ModelConfig
from hope_jax.data import books
from hope_jax.data.tokenizers import ByteTokenizer, CharTokenizer
from hope_jax.train.state import ModelDef
from tests.conftest import run_cli

BOOK = "Chapter 1\n\n" + "The whale swam through the cold grey water. Zoë ate a crêpe. " * 20


@pytest.fixture(scope="module")
def books_run(tmp_path_factory):
  """A preprocessed books folder and one checkpoint of a tiny model on it.

  The config is what `--config.data.data_type=books --config.data.data_path=...`
  saves: `data.tokenizer` keeps its default 'byte'. Returns (folder, manifest).
  """
  root = tmp_path_factory.mktemp("books_run")
  (root / "raw").mkdir()
  (root / "raw" / "notes.txt").write_text(BOOK, encoding="utf-8")
  meta = books.preprocess(str(root / "raw"), str(root / "corpus"))
  cfg = tiny.get_config()
  cfg.data.data_type, cfg.data.data_path = "books", str(root / "corpus")
  cfg.model.vocab_size = meta["vocab_size"]
  cfg.training.checkpoint_dir = str(root / "run")
  params = ModelDef(ModelConfig.from_config(cfg.model)).init_params(seed=0)
  state = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(1),
           "rng": jax.random.key(0)}
  manager = CheckpointManager(cfg)
  manager.save(1, state, {"step": 1}, force=True)
  manager.close()
  (info,) = checkpoint.list_checkpoints(str(root / "run"))
  return str(root / "corpus"), info.manifest_path


def test_a_books_run_samples_with_its_folders_vocabulary(books_run, monkeypatch, capsys,
                                                         tmp_path):
  folder, manifest = books_run
  vocab = CharTokenizer.load(os.path.join(folder, "vocab.json"))
  # The command: char ids decoded as characters, not as bytes (an untrained model's ids
  # < vocab_size would be control characters such as NUL).
  monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(
      checkpoint_dir=os.path.dirname(manifest), prompt="The whale", max_new_tokens=12,
      temperature=1.0, seed=0, top_k=0, top_p=1.0, tokenizer_path=None))
  sample.main(["hope_jax.sample"])
  text = capsys.readouterr().out.rstrip("\n")
  assert text and set(text) <= set(vocab.itos[2:]) | {"\ufffd"}, repr(text)
  flags.FLAGS.checkpoint_dir = manifest  # A manifest names one checkpoint, as in load_model.
  sample.main(["hope_jax.sample"])
  assert capsys.readouterr().out.rstrip("\n") == text

  config = checkpoint.restore(manifest).config
  assert config.data.tokenizer == "byte"  # The saved config alone would say bytes.
  assert sample.run_tokenizer(config).itos == vocab.itos

  # The data folder is not on this machine: one line naming it and the flag to pass.
  config.data.data_path = str(tmp_path / "elsewhere")
  with pytest.raises(ConfigError, match=r"no such file or directory: .*elsewhere; pass "
                     r"--tokenizer_path=VOCAB_JSON") as err:
    sample.run_tokenizer(config)
  assert "\n" not in str(err.value)
  copy = str(tmp_path / "vocab.json")
  vocab.save(copy)
  assert sample.run_tokenizer(config, tokenizer_path=copy).itos == vocab.itos
  # Or the vocabulary the training loop keeps beside the checkpoints, checked against the
  # fingerprint the checkpoint recorded (when it did).
  for record in ({}, {"tokenizer_fingerprint": vocab.fingerprint()}):
    assert sample.run_tokenizer(config, run_dir=str(tmp_path), loader_state=record).itos == \
        vocab.itos
  with pytest.raises(ConfigError, match="is not the vocabulary the run was trained with"):
    sample.run_tokenizer(config, run_dir=str(tmp_path),
                         loader_state={"tokenizer_fingerprint": "0123456789abcdef"})
  assert isinstance(sample.run_tokenizer(config, loader_state={"tokenizer_fingerprint": "byte"}),
                    ByteTokenizer)
  CharTokenizer(["a", "b"]).save(copy)
  with pytest.raises(ConfigError, match="has 4 tokens but the run's model.vocab_size is"):
    sample.run_tokenizer(config, tokenizer_path=copy)
  with pytest.raises(ConfigError, match="--tokenizer_path: no such file"):
    sample.run_tokenizer(config, tokenizer_path=str(tmp_path / "missing.json"))
  # Ids the model has no embedding for are refused, not clamped silently.
  n = vocab.vocab_size
  with pytest.raises(ConfigError, match=rf"token id 104, but model.vocab_size is {n}"):
    sample.encode_prompt(ByteTokenizer(), "The", n)
  assert sample.encode_prompt(vocab, "The", n).shape == (1, 3)


def _flags(module, folder, manifest, out, **bad):
  run_dir = os.path.dirname(manifest)
  values = {
      sample: dict(checkpoint_dir=run_dir, prompt="The", max_new_tokens=4, temperature=0.8,
                   seed=0, top_k=0, top_p=1.0, tokenizer_path=None),
      export: dict(checkpoint_dir=run_dir, checkpoint=None, output=out, seq_len=None,
                   dynamic_length=False, batch_size=None, platforms=None),
      evaluate: dict(checkpoint_dir=run_dir, all=False, checkpoint=None, write_manifest=False,
                     output=None, metric="eval/loss", mode="min", batch_size=16,
                     max_windows=None),
  }[module]
  return types.SimpleNamespace(**{**values, **bad})


@pytest.mark.parametrize("module,bad,message", [
    (sample, dict(max_new_tokens=-1), "--max_new_tokens must be an integer >= 1, got -1"),
    (sample, dict(max_new_tokens=0), "--max_new_tokens must be an integer >= 1, got 0"),
    (sample, dict(top_k=-3), "--top_k must be an integer >= 0 (0 keeps every token), got -3"),
    (sample, dict(top_p=0.0), "--top_p must be in (0, 1] (1 turns it off), got 0.0"),
    (sample, dict(top_p=1.5), "--top_p must be in (0, 1]"),
    (sample, dict(top_p=float("nan")), "--top_p must be in (0, 1]"),
    (sample, dict(temperature=-1.0), "--temperature must be a finite number >= 0"),
    (sample, dict(prompt=""), "--prompt must not be empty"),
    (sample, dict(checkpoint_dir=None), "--checkpoint_dir is required"),
    (export, dict(batch_size=0), "--batch_size must be at least 1 when given, got 0"),
    (export, dict(batch_size=-2), "--batch_size must be at least 1 when given, got -2"),
    (export, dict(seq_len=0), "--seq_len must be at least 1 when given, got 0"),
    (export, dict(seq_len=8, dynamic_length=True), "exclude each other"),
    (evaluate, dict(max_windows=0), "--max_windows must be at least 1"),
    (evaluate, dict(max_windows=-2), "--max_windows must be at least 1"),
])
def test_bad_flags_fail_before_anything_is_loaded(books_run, monkeypatch, tmp_path, module, bad,
                                                  message):
  folder, manifest = books_run
  out = str(tmp_path / "model.jax_export")
  values = _flags(module, folder, manifest, out, **bad)
  monkeypatch.setattr(flags, "FLAGS", values)
  monkeypatch.setattr(evaluate, "F", values)  # evaluate binds FLAGS at import.
  with pytest.raises(ConfigError) as err:
    module.main([module.__name__])
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not os.path.exists(out)  # export: nothing written.


@pytest.mark.parametrize("args,message", [
    (["--top_p=0"], "hope_jax.sample: error: --top_p must be in (0, 1]"),
    (["--top_kk=3"], "hope_jax.sample: error: Unknown command line flag 'top_kk'"),
    (["--top_k=many"], "hope_jax.sample: error: bad value for flag --top_k: 'many' (expected int)"),
])
def test_sample_command_errors_are_one_line_exit_2(tmp_path, args, message):
  proc = run_cli(["-m", "hope_jax.sample", f"--checkpoint_dir={tmp_path}/none", "--prompt=x",
                  *args], env={"TF_CPP_MIN_LOG_LEVEL": "3"})
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if "xla_bridge" not in line]
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
