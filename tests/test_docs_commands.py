"""The commands quoted in README.md and docs/checkpoints.md work as written.

The commands are read out of the docs' fenced ```bash (and ```python) blocks, never
copied here, and run in order (README's Python API block too) in a scratch directory that looks like a clone of the
repository (its top-level entries are symlinked), so relative paths such as
`experiments/base.py` and `checkpoints/run1` mean what they mean to a reader.

What the test changes, all listed below, is size, never meaning:
  * `TRAIN_SHRINK` goes right after `--config=...`, so a run takes seconds and every
    override the docs write themselves still wins. It includes the block: HOPE's step
    compiles for ~20 s per learning rate on 2 CPU cores, against ~3 s for
    Transformer++; what these commands exercise is the CLI and checkpoints, and the
    blocks have their own tests. The schedule is constant for the same reason: a
    cosine bakes `num_steps` into the step, one more compile per stage.
  * Step numbers in the docs (`num_steps=1000`, `checkpoint_step_500_...`) are base
    config steps; they are divided by `STEP_SCALE`. The example manifest name (its
    timestamp is made up) stands for the real manifest of that step.
  * `SKIPS` lists the commands that cannot run inside a test, each with its reason.
"""

import json
import os
import re
import shlex

import pytest

from hope_jax.train import host_devices
from tests.conftest import REPO, run_cli

STEP_SCALE = 100  # base.py: 600 steps, saves every 100 -> 6 steps, saves every 2.
TRAIN_SHRINK = [
    "--config.model.block=transformer_pp", "--config.model.hidden_size=32",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.data.seq_len=32",
    "--config.training.batch_size=2", "--config.training.lr_schedule=constant",
    "--config.training.warmup_steps=0", "--config.training.num_steps=6",
    "--config.training.save_every=2", "--config.training.eval_every=4",
    "--config.training.eval_batches=1", "--config.training.log_every=1",
    "--config.training.progress_bar=False"]
# Scores a few validation windows instead of all ~700 per checkpoint.
EVALUATE_SHRINK = ["--max_windows=4"]
# Commands (matched by their start) that cannot run inside a test.
SKIPS = {
    "python3 -m venv": "creates a virtual environment; the test runs in the one it started in",
    ".venv/bin/pip install": "installs packages (the test's environment has them)",
    ".venv/bin/python -m pytest": "the whole test suite, which includes this test",
    "python benchmarks/compare.py --tiny": "six trainings, ~3 min on 2 CPU cores; "
                                           "tests/test_compare.py runs this command",
}
# `.venv/bin/python` is the venv the skipped commands would have made: the test's own.
INTERPRETERS = ("python", "python3", ".venv/bin/python")
_EXAMPLE_MANIFEST = re.compile(r"checkpoint_step_(\d+)_ts_1234567894\.json")


# ------------------------------------------------------------------ reading the docs


def doc_blocks(name: str, lang: str) -> dict[str, list[str]]:
  """Fenced blocks of one language, by the title of the section they are in."""
  sections: dict[str, list[str]] = {}
  title, body = "", None
  for line in open(os.path.join(REPO, name), encoding="utf-8"):
    if body is not None:
      if line.startswith("```"):
        sections.setdefault(title, []).append("".join(body))
        body = None
      else:
        body.append(line)
    elif line.startswith("#"):
      title = line.lstrip("#").strip()
    elif line.strip() == f"```{lang}":
      body = []
  return sections


def shell_commands(block: str) -> list[list[str]]:
  """Splits a bash block into commands: `\\` continues a line, `#` starts a comment, `&&` chains."""
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    while words:
      end = words.index("&&") if "&&" in words else len(words)
      commands.append(words[:end])
      words = words[end + 1:]
  return commands


def section(sections: dict[str, list[str]], prefix: str, count: int) -> list[list[str]]:
  """The commands of the one section whose title starts with `prefix`, `count` of them."""
  titles = [t for t in sections if t.startswith(prefix)]
  assert len(titles) == 1, f"no single section {prefix!r} with commands in {list(sections)}"
  commands = [c for block in sections[titles[0]] for c in shell_commands(block)]
  assert len(commands) == count, f"{titles[0]!r}: the test expects {count} commands: {commands}"
  return commands


# ------------------------------------------------------------------ running them


def skip_reason(words: list[str]) -> str | None:
  text = " ".join(words)
  return next((why for start, why in SKIPS.items() if text.startswith(start)), None)


def scaled(workdir, arg: str) -> str:
  """Rewrites base-config step numbers in one argument to the test's scale."""
  key, eq, value = arg.partition("=")
  if eq and key == "--config.training.num_steps":
    return f"{key}={max(1, int(value) // STEP_SCALE)}"
  m = _EXAMPLE_MANIFEST.search(arg)
  if m:
    step = int(m.group(1)) // STEP_SCALE
    folder = os.path.join(workdir, os.path.dirname(arg[arg.index("=") + 1:]))
    real = [n for n in os.listdir(folder) if n.startswith(f"checkpoint_step_{step}_ts_")]
    assert len(real) == 1, f"{arg}: no single manifest of step {step} in {sorted(os.listdir(folder))}"
    return arg.replace(m.group(0), real[0])
  return arg


def run(workdir, words: list[str], *extra: str, env=None):
  """Runs one documented command (shrunk as the module docstring says); returns the process."""
  assert skip_reason(words) is None, words
  assert words[0] in INTERPRETERS, f"not a python command: {words}"
  args = [scaled(workdir, a) for a in words[1:]]
  if args[:2] == ["-m", "hope_jax.train"]:
    at = next(i for i, a in enumerate(args) if a.startswith("--config=")) + 1
    args[at:at] = TRAIN_SHRINK
  elif args[:2] == ["-m", "hope_jax.evaluate"]:
    args += EVALUATE_SHRINK
  proc = run_cli([*args, *extra], cwd=workdir, timeout=300, env=env)
  assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


def steps(workdir, directory: str) -> list[int]:
  from hope_jax import checkpoint

  listed = checkpoint.list_checkpoints(os.path.join(workdir, directory))
  assert all(c.valid for c in listed), listed
  return [c.step for c in listed]


def logged_lr(workdir, directory: str, step: int) -> float:
  with open(os.path.join(workdir, directory, "logs", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return next(r["train/learning_rate"] for r in rows
              if r["step"] == step and "train/learning_rate" in r)


# All runs share one XLA compilation cache: most compile the same step.
pytestmark = pytest.mark.usefixtures("xla_compile_cache")


@pytest.fixture
def workdir(tmp_path):
  """A scratch directory that looks like a fresh clone: the repository's entries, linked."""
  for name in os.listdir(REPO):
    if name not in (".git", "checkpoints", "books", ".venv") and not name.startswith("."):
      os.symlink(os.path.join(REPO, name), tmp_path / name)
  return tmp_path


# ------------------------------------------------------------------ the docs


def test_parser_joins_continuations_and_drops_comments():
  block = ("# a comment\npython -m x --a=1 \\\n  --b='two words'  # why\n"
           "python3 -m venv .venv && .venv/bin/pip install -e .\n")
  assert shell_commands(block) == [
      ["python", "-m", "x", "--a=1", "--b=two words"],
      ["python3", "-m", "venv", ".venv"], [".venv/bin/pip", "install", "-e", "."]]


def test_checkpoints_doc_scenarios(workdir):
  bash = doc_blocks("docs/checkpoints.md", "bash")
  (new_run,) = section(bash, "1.", 1)
  (branch,) = section(bash, "2.", 1)
  (new_lr,) = section(bash, "3.", 1)
  stage1, stage2 = section(bash, "4.", 2)
  (evaluate,) = section(bash, "5.", 1)
  (housekeeping,) = section(bash, "6.", 1)

  # 1. A new run, cut short at step 5 (in the docs' units, 500) as a crash would: the
  # crash itself (kill -9, Ctrl-C) is tested in test_resume.py and test_cli.py.
  proc = run(workdir, new_run, "--config.training.num_steps=5")
  assert "starting from step 0" in proc.stderr
  assert steps(workdir, "checkpoints/run1") == [2, 4, 5]

  # 2. Resume from a named checkpoint into a branch of its own.
  proc = run(workdir, branch)
  assert "Resumed from step 5" in proc.stderr
  assert "1 step(s) remain: training ends at step 6" in proc.stderr
  assert steps(workdir, "checkpoints/run1_from500") == [6]

  # 3. Rerun the interrupted job with a new learning rate: it finishes the job, at the new lr.
  proc = run(workdir, new_lr)
  assert "Resumed from step 5" in proc.stderr and "training ends at step 6" in proc.stderr
  from hope_jax import checkpoint

  latest = checkpoint.restore_latest(str(workdir / "checkpoints/run1"))
  assert latest.step == 6 and latest.config.training.learning_rate == 1e-3
  assert logged_lr(workdir, "checkpoints/run1", 6) == pytest.approx(1e-3)
  assert logged_lr(workdir, "checkpoints/run1_from500", 6) == pytest.approx(3e-3)

  # 4. Two stages, each ending at its own num_steps.
  proc = run(workdir, stage1)
  assert "Resumed from step 6" in proc.stderr
  assert "4 step(s) remain: training ends at step 10" in proc.stderr
  proc = run(workdir, stage2)
  assert "Resumed from step 10" in proc.stderr
  assert "10 step(s) remain: training ends at step 20" in proc.stderr
  assert steps(workdir, "checkpoints/run1") == [2, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20]

  # 5. Every checkpoint scored, the best one marked; then the same from Python.
  proc = run(workdir, evaluate)
  m = re.search(r"Scored 11 of 11 checkpoint\(s\) .* best by eval/loss \(min\): step (\d+)",
                proc.stdout)
  assert m, proc.stdout
  marked = [line for line in proc.stdout.splitlines() if "*" in line]
  assert len(marked) == 1 and m.group(1) in marked[0].split(), proc.stdout
  (python_block,) = doc_blocks("docs/checkpoints.md", "python")["5. Evaluate several checkpoints, pick the best"]
  script = workdir / "scenario5.py"
  script.write_text(python_block)
  proc = run(workdir, ["python", "scenario5.py"])
  lines = proc.stdout.splitlines()
  assert [int(line.split()[0]) for line in lines[:11]] == steps(workdir, "checkpoints/run1")
  assert lines[11].split()[0] == "20" and lines[12] == "(1, 11, 256)", proc.stdout

  # 6. keep_last=5 with keep_best: the newest five, plus the best by eval/loss if older.
  proc = run(workdir, housekeeping)
  assert "training ends at step 25" in proc.stderr
  kept = steps(workdir, "checkpoints/run1")
  assert kept[-5:] == [18, 20, 22, 24, 25] and len(kept) in (5, 6), kept
  assert not any(n.startswith("checkpoint_step_2_") for n in os.listdir(workdir / "checkpoints/run1"))

  # 7. Checkpoints stay out of version control.
  with open(os.path.join(REPO, ".gitignore")) as f:
    assert "checkpoints/" in f.read().split()


def test_readme_commands(workdir):
  bash = doc_blocks("README.md", "bash")
  setup = section(bash, "Set-up", 6)
  (override,) = section(bash, "Configuration", 1)
  sample, evaluate, export, preprocess, compare = section(bash, "Other commands", 5)
  assert skip_reason(compare)
  skipped = [c for c in setup if skip_reason(c)]
  assert len(skipped) == 5, skipped  # Everything but the main job.
  (main_job,) = [c for c in setup if not skip_reason(c)]

  # As on a fresh machine: without conftest's single CPU device (or any host-device flag).
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                     os.environ.get("XLA_FLAGS", ""))
  proc = run(workdir, main_job, env={"JAX_NUM_CPU_DEVICES": None, "XLA_FLAGS": xla_flags})
  assert "final eval at step 6" in proc.stderr and steps(workdir, "checkpoints") == [2, 4, 6]
  # training.cpu_devices=-1 (the default): one CPU device per core that divides the batch.
  split = host_devices.auto_count({"data": -1, "fsdp": 1}, 2, host_devices.usable_cores())
  if split > 1:
    assert f"CPU split into {split} XLA device(s)" in proc.stderr, proc.stderr[-3000:]
    assert f"Devices: {split} cpu devices in 1 process(es): mesh data={split}" in proc.stderr
  else:
    assert "CPU split into" not in proc.stderr
  assert os.path.exists(workdir / "checkpoints/logs/metrics.jsonl")

  # The Python API block, as written: the base HOPE model and the main job's checkpoints.
  (api_block,) = doc_blocks("README.md", "python")["Python API"]
  (workdir / "api.py").write_text(api_block)
  proc = run(workdir, ["python", "api.py"])
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and all("valid=True" in line for line in lines[:3]), proc.stdout
  assert lines[3] == "(1, 15, 256) (1, 256) 6", proc.stdout

  proc = run(workdir, override)
  assert steps(workdir, "checkpoints/d64") == [1]
  from hope_jax import checkpoint

  assert checkpoint.restore_latest(str(workdir / "checkpoints/d64")).config.model.hidden_size == 64

  proc = run(workdir, sample)
  assert proc.stdout.strip() and "200 tokens in" in proc.stderr
  proc = run(workdir, evaluate)
  assert "best by eval/loss (min): step" in proc.stdout
  assert sum("*" in line for line in proc.stdout.splitlines()) == 1, proc.stdout
  proc = run(workdir, export)
  assert os.path.getsize(workdir / "model.jax_export") > 0

  # The reader's own books; here one short text is enough.
  (workdir / "books").mkdir()
  (workdir / "books" / "notes.txt").write_text("Chapter 1\n\nA short book about memory. " * 50)
  run(workdir, preprocess)
  assert os.path.exists(workdir / "corpus" / "vocab.json")
