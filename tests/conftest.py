"""Shared test settings: float32, strict rank promotion, tiny configs."""

import os
import sys

import pytest

# Tests are tiny, so XLA's compile time dominates them. The flags below cut it. They are added
# to any XLA_FLAGS already set (e.g. flags under test on a GPU, benchmarks/gpu_check.sh's
# TEST_ENV), and a flag named there wins. Subprocesses and xdist workers inherit the result.
# - Skip the expensive LLVM passes (about half the compile time).
# - XLA:CPU's loop emitters instead of its MLIR fusion emitters: the same programs compile in
#   ~40% less time, and a clean-clone .ci/run took 10:39 instead of 15-16 minutes
#   (docs/performance.md#test-time). Tests only: at full optimisation it compiles slower.
#   Newer XLA has dropped this flag (jaxlib 0.12 does not know it), and an unknown XLA_FLAGS
#   entry aborts the process, so a probe process must accept it first.
_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_PROBED_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def _xla_accepts(flag):
  """Whether a process with `flag` in XLA_FLAGS starts XLA's CPU client (about 1 s)."""
  import subprocess

  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True, timeout=120).returncode == 0


def _add_xla_flags():
  named = os.environ.get("XLA_FLAGS", "")
  added = [f for f in _XLA_FLAGS if f.split("=")[0] not in named]
  if not os.environ.get("HOPE_JAX_TEST_XLA_PROBED"):  # Once: xdist workers inherit the verdict.
    added += [f for f in _PROBED_XLA_FLAGS if f.split("=")[0] not in named and _xla_accepts(f)]
    os.environ["HOPE_JAX_TEST_XLA_PROBED"] = "1"
  os.environ["XLA_FLAGS"] = " ".join([named, *added]).strip()


_add_xla_flags()

# The CLI runs of the tests are tiny, where splitting the CPU into devices
# (training.cpu_devices=-1) costs a few seconds of set-up per run and gains nothing: keep
# one CPU device unless a test asks (test_readme_commands runs the default split).
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The longest modules run first (worker seconds under `--durations=0`, session 29). With
# `--dist loadfile` a module runs whole on one worker, in collection order, so a long module
# collected last would keep one core busy after the other had run out of work.
_LONGEST_MODULES = ("test_lm.py", "test_titans_layer.py", "test_docs_commands.py",
                    "test_distributed.py", "test_notebooks.py", "test_diagnostics.py",
                    "test_cli.py", "test_train.py", "test_resume.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: each module's order.


@pytest.fixture(scope="module")
def xla_compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the subprocesses of a test module."""
  keys = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  old = {k: os.environ.get(k) for k in keys}
  os.environ.update({keys[0]: str(tmp_path_factory.mktemp("xla_cache")), keys[1]: "0"})
  yield
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture
def tiny_config():
  from experiments import tiny

  return tiny.get_config()


def run_cli(args, *, cwd=REPO, timeout=600, env=None):
  """Runs `python -m ...` in a subprocess; returns the CompletedProcess."""
  import subprocess

  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
  for key, value in (env or {}).items():  # None removes a variable.
    if value is None:
      full_env.pop(key, None)
    else:
      full_env[key] = value
  return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                        text=True, timeout=timeout)
