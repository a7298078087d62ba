"""The main job: a small HOPE model on the embedded default corpus, ~5 min on 2 CPU cores.

Run:
  python -m hope_jax.train --config=experiments/base.py

Override any key from the command line, e.g.
  python -m hope_jax.train --config=experiments/base.py --config.training.num_steps=50
"""

import os

from ml_collections import config_dict

from hope_jax.config import ModelConfig


def own_checkpoint_dir(config_file: str) -> str:
  """./checkpoints/<the file's path under experiments/>: every other experiment's own folder.

  A run of another model in the main job's ./checkpoints would stop on the model mismatch
  (or, with resume_from=None, refuse the non-empty folder).
  """
  here = os.path.dirname(os.path.abspath(__file__))
  name = os.path.splitext(os.path.relpath(os.path.abspath(config_file), here))[0]
  if name.startswith(".."):  # A config file of one's own, outside experiments/.
    name = os.path.splitext(os.path.basename(config_file))[0]
  return "./checkpoints/" + name.replace(os.sep, "/")


def get_config() -> config_dict.ConfigDict:
  """Returns the base experiment config (`model`, `training`, `data`)."""
  cfg = config_dict.ConfigDict()

  # Every ModelConfig field is present so any can be overridden from the CLI.
  cfg.model = config_dict.ConfigDict(ModelConfig().to_dict())
  cfg.model.block = "hope"  # Self-modifying Titans + Continuum Memory System.
  cfg.model.vocab_size = 256  # Byte-level tokens.
  cfg.model.hidden_size = 128
  cfg.model.num_layers = 2
  cfg.model.num_heads = 4
  cfg.model.chunk_other = 16
  # Dual reads at C_m=16 had the lowest validation loss of chunk_start/dual x C_m 16/64
  # (python benchmarks/read_modes.py; docs/results.md).
  cfg.model.chunk_mem = 16
  cfg.model.read_mode = "dual"
  # C_K = seq_len, as the spec's C_4 = L = 4096: no training token reads the slowest level's
  # writes, so it trains as a static SwiGLU (docs/architecture.md, "Levels nobody reads").
  cfg.model.cms_chunks = (32, 64, 128)

  cfg.training = config_dict.ConfigDict()
  t = cfg.training
  t.batch_size = 8  # Sequences per step (global, over all devices).
  t.learning_rate = 3e-3  # Peak learning rate after warmup.
  t.min_lr_ratio = 0.1  # Cosine decays to learning_rate * min_lr_ratio.
  t.warmup_steps = 50  # Linear learning-rate warmup from 0.
  t.lr_schedule = "cosine"  # "cosine" | "constant"
  t.weight_decay = 0.1  # AdamW; not applied to norms, biases and gate biases.
  t.b1 = 0.9  # AdamW first-moment decay.
  t.b2 = 0.95  # AdamW second-moment decay.
  t.grad_clip = 1.0  # Global-norm clip of the outer gradient.
  t.num_steps = 600  # The step the run ends at (a total, not "this many more").
  t.log_every = 25  # Steps between log lines (loss, bits, lr, tokens/s, time left).
  t.eval_every = 200  # Steps between validation evaluations (and always at the end).
  t.eval_batches = 8  # Validation batches per evaluation.
  # After each evaluation (and its save), log the self-modifying memories' drift and rates on
  # one validation sequence (spec §6; hope_jax.diagnostics.health; skipped with several processes).
  t.health = True
  t.seed = 0  # Seeds parameters, the RNG state and the batch order.
  # One directory per experiment (every other experiments/ file sets ./checkpoints/<its
  # name>); logs go under it too.
  t.checkpoint_dir = "./checkpoints"
  t.save_every = 100  # Steps between checkpoints; one is always written at the end.
  # "latest" (default: rerunning the same command after a crash finishes the job; starts
  # fresh on an empty checkpoint_dir), a manifest path, or None (fresh; refuses to overwrite).
  t.resume_from = config_dict.FieldReference("latest", field_type=str)
  t.keep_last = config_dict.placeholder(int)  # Keep only the newest N checkpoints.
  t.keep_best = config_dict.placeholder(str)  # Metric to also keep the best by, e.g. "eval/loss".
  t.keep_best_mode = "min"  # "min" | "max"
  t.log_dir = config_dict.placeholder(str)  # Metrics JSONL + TensorBoard; None -> checkpoint_dir/logs.
  t.progress_bar = True  # Only shown on an interactive terminal.
  # Devices (docs/distributed.md). The batch is split over data x fsdp devices; parameters
  # and optimizer state are sharded over fsdp. -1 means "all remaining devices"; the
  # product must equal the device count and divide batch_size. One device: nothing changes.
  t.mesh = config_dict.ConfigDict()
  t.mesh.data = -1  # Data parallel (replicated parameters).
  t.mesh.fsdp = 1  # Fully sharded data parallel (parameters split, gathered for compute).
  t.mesh.fsdp_min_size = 4096  # Parameters with fewer elements stay replicated.
  # CPU only: XLA devices the cores are split into, so the mesh runs batch slices side by
  # side; -1: one per core that divides the batch (docs/distributed.md), 1: JAX's default.
  t.cpu_devices = -1
  # Several processes/hosts: "auto" joins them when a coordinator is given (here or in
  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); "on" lets JAX detect
  # the cluster (TPU slice, SLURM, Open MPI); "off" never joins.
  t.distributed = "auto"
  t.coordinator_address = config_dict.placeholder(str)  # "host0:1234", the same everywhere.
  t.num_processes = config_dict.placeholder(int)  # Processes in the job (one per host or GPU).
  t.process_id = config_dict.placeholder(int)  # 0 .. num_processes - 1; 0 logs and writes.

  cfg.data = config_dict.ConfigDict()
  d = cfg.data
  d.data_type = "default"  # "default" | "random" | "text" | "books" | "mqar" | "passkey"
  d.data_path = config_dict.placeholder(str)  # File or folder for "text" / "books".
  d.tokenizer_path = config_dict.placeholder(str)  # vocab.json for character vocabularies.
  d.tokenizer = "byte"  # "byte" | "char" (books/text with a vocab.json)
  d.seq_len = 128  # Tokens per training sequence.
  d.val_fraction = 0.05  # Tail of the token stream held out for validation.
  d.preserve_structure = False  # books: keep chapter/paragraph markers.
  d.enable_ocr = False  # books: OCR scanned PDFs with Tesseract.
  d.ocr_lang = "eng"  # Tesseract language(s), e.g. "eng+chi_sim" (needs tesseract-ocr-chi-sim).
  # text: corpora of at least this many MiB are encoded once into a memory-mapped token cache.
  d.memmap_min_mb = 64.0
  d.cache_dir = config_dict.placeholder(str)  # Token caches; None -> <data folder>/.hope_jax_cache.
  # Memory tasks (data_type "mqar" | "passkey", hope_jax/data/tasks.py): every example
  # is one window of seq_len + 1 tokens; evaluation reports accuracy at the answers.
  d.task_train_examples = 16384  # Examples generated for training (seeded).
  d.task_val_examples = 256  # Held-out examples (another seed domain).
  d.task_seed = 0  # Seed of the synthetic task examples (validation uses its own stream).
  d.mqar_pairs = 8  # Key-value pairs per example (distinct keys).
  d.mqar_queries = config_dict.placeholder(int)  # Keys asked back; None -> all pairs.
  d.mqar_gap = config_dict.placeholder(int)  # Filler tokens before the queries; None -> max.
  d.passkey_digits = 5  # Length of the hidden number.
  d.passkey_depth = config_dict.placeholder(float)  # Needle depth in [0, 1]; None -> random.
  return cfg
