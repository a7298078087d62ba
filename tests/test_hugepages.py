"""The training CLI's restart with glibc's huge-page tunable (`hope_jax.train.hugepages`)."""

import os
import platform
import subprocess
import sys

import pytest

from hope_jax.train import hugepages
from tests.conftest import REPO

LINUX = ("Linux", ("glibc", "2.36"))
# Linux with glibc >= 2.35: where the module's own rule would restart, given the kernel's mode.
GLIBC_OK = hugepages.tunables_to_set({}, platform.system(), platform.libc_ver(), "madvise") is not None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(f)) == "always"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("env,system,libc,mode,expected", [
    ({}, *LINUX, "madvise", "glibc.malloc.hugetlb=1"),
    # The user's own tunables are kept.
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, *LINUX, "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    # Already set (after the restart, or by the user, to any value): no restart.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, *LINUX, "madvise", None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, *LINUX, "madvise", None),
    ({"HOPE_JAX_HUGE_PAGES": "0"}, *LINUX, "madvise", None),
    # The kernel gives huge pages anyway, or never; glibc too old or not glibc; not Linux.
    ({}, *LINUX, "always", None),
    ({}, *LINUX, "never", None),
    ({}, *LINUX, None, None),
    ({}, "Linux", ("glibc", "2.31"), "madvise", None),
    ({}, "Linux", ("", ""), "madvise", None),
    ({}, "Darwin", ("", ""), "madvise", None),
    # Restarted once already (whatever dropped the tunable on the way): not again.
    ({"_HOPE_JAX_HUGE_PAGES_RESTARTED": "1"}, *LINUX, "madvise", None),
    # Training on a GPU or TPU: no restart, unless JAX_PLATFORMS puts the CPU first.
    ({"JAX_PLATFORMS": "cuda"}, *LINUX, "madvise", None),
    ({"JAX_PLATFORMS": "cuda,cpu"}, *LINUX, "madvise", None),
    ({"JAX_PLATFORMS": "cpu"}, *LINUX, "madvise", "glibc.malloc.hugetlb=1"),
])
def test_tunables_to_set(env, system, libc, mode, expected):
  assert hugepages.tunables_to_set(env, system, libc, mode) == expected


def test_a_jax_plugin_counts_as_an_accelerator_where_jax_would_find_it(tmp_path, monkeypatch):
  if hugepages.accelerator_installed():
    pytest.skip("a GPU or TPU plugin is installed here")
  # The `jax_plugins` namespace package (a module in it) ...
  (tmp_path / "ns" / "jax_plugins").mkdir(parents=True)
  (tmp_path / "ns" / "jax_plugins" / "fake_gpu.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path / "ns"))
  assert hugepages.accelerator_installed()
  monkeypatch.undo()
  assert not hugepages.accelerator_installed()
  # ... or an installed distribution's `jax_plugins` entry point.
  info = tmp_path / "ep" / "fake_gpu_plugin-1.0.dist-info"
  info.mkdir(parents=True)
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gpu-plugin\nVersion: 1.0\n")
  (info / "entry_points.txt").write_text("[jax_plugins]\nfake_gpu = fake_gpu_plugin\n")
  monkeypatch.syspath_prepend(str(tmp_path / "ep"))
  assert hugepages.accelerator_installed()


def test_an_installed_accelerator_plugin_means_no_restart_unless_the_cpu_is_asked_for():
  assert hugepages.tunables_to_set({}, *LINUX, "madvise", accelerator=True) is None
  assert hugepages.tunables_to_set({"JAX_PLATFORMS": "cpu"}, *LINUX, "madvise",
                                   accelerator=True) == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("argv,module", [
    (["python", "-m", "hope_jax.train", "--config=x"], "hope_jax.train"),
    (["python", "-mhope_jax.train"], "hope_jax.train"),
    (["python", "-u", "-X", "importtime", "-W", "ignore", "-m", "hope_jax.train"],
     "hope_jax.train"),
    (["python", "-m", "pdb", "-m", "hope_jax.train"], "pdb"),
    (["python", "script.py", "-m", "hope_jax.train"], None),
    (["python", "-c", "code", "-m", "hope_jax.train"], None),
    (["python"], None),
])
def test_module_run_is_the_interpreters_own_module(argv, module):
  assert hugepages.module_run(argv) == module


LOADER = "/lib64/ld-linux-x86-64.so.2"


@pytest.mark.skipif(not os.path.exists(LOADER) or not GLIBC_OK,
                    reason="needs glibc >= 2.35's x86-64 loader")
def test_glibc_accepts_the_tunable():
  # The loader lists the tunables it read: a misspelt one would be ignored silently.
  out = subprocess.run([LOADER, "--list-tunables"], capture_output=True, text=True, check=True,
                       env={"GLIBC_TUNABLES": hugepages.TUNABLE}).stdout
  assert "glibc.malloc.hugetlb: 0x1 " in out


# A stand-in for `python -m hope_jax.train`: the kernel's mode and the plugins are fixed, so
# the restart itself is exercised on any Linux with glibc >= 2.35.
MODULE = """
import os, sys
print("before", os.getpid(), flush=True)
from hope_jax.train import hugepages
hugepages.thp_mode = lambda *a: "madvise"
hugepages.accelerator_installed = lambda: False
hugepages.restart_with_huge_pages(module="fake_train")
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), hugepages.active(), sys.argv[1:])
"""


@pytest.mark.skipif(not GLIBC_OK, reason="needs Linux with glibc >= 2.35")
def test_the_restart_reruns_the_same_command_in_the_same_process(tmp_path):
  (tmp_path / "fake_train.py").write_text(MODULE)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hugepages.OFF_SWITCH, hugepages.RESTARTED)}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
  env["JAX_PLATFORMS"] = "cpu"

  def run(*args):
    return subprocess.run([sys.executable, *args, "-m", "fake_train", "--flag=1"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True).stdout.splitlines()

  out = run()
  pids = [l.split()[1] for l in out if l.startswith("before")]
  assert len(pids) == 2 and pids[0] == pids[1]  # Ran twice, as one process (execve).
  assert out[2] == f"after {pids[0]} glibc.malloc.hugetlb=1 True ['--flag=1']"
  # Interpreter options are kept.
  assert run("-X", "utf8")[-1].endswith("True ['--flag=1']")
  # Turned off: one run, no tunable.
  env[hugepages.OFF_SWITCH] = "0"
  out = run()
  assert out[0].startswith("before") and out[1].startswith("after") and "None False" in out[1]
