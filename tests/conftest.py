"""Shared test settings: float32, strict rank promotion, tiny configs."""

import os
import sys

# Tests are tiny, so XLA's compile time dominates them: skip the expensive LLVM passes
# (about half the compile time). Added to any XLA_FLAGS already set (e.g. flags under test on
# a GPU, benchmarks/gpu_check.sh's TEST_ENV); a flag named there wins. Subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")]
    + [f for f in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
       if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()

# The CLI runs of the tests are tiny, where splitting the CPU into devices
# (training.cpu_devices=-1) costs a few seconds of set-up per run and gains nothing: keep
# one CPU device unless a test asks (test_readme_commands runs the default split).
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")

import jax  # noqa: E402
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
