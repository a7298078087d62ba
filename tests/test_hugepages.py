"""The training CLI's restart with glibc's huge-page tunable (`hope_jax.train.hugepages`)."""

import os
import platform
import subprocess
import sys

import pytest

from hope_jax.train import hugepages
from tests.conftest import REPO

LINUX = ("Linux", ("glibc", "2.36"))


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
])
def test_tunables_to_set(env, system, libc, mode, expected):
  assert hugepages.tunables_to_set(env, system, libc, mode) == expected


WOULD_RESTART = hugepages.tunables_to_set(
    {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, platform.system(),
    platform.libc_ver(), hugepages.thp_mode()) is not None

SCRIPT = """
import os, sys
print("before", os.getpid(), flush=True)
from hope_jax.train import hugepages
hugepages.restart_with_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), hugepages.active(), sys.argv[1:])
"""


@pytest.mark.skipif(not WOULD_RESTART, reason="this machine's kernel or libc gains nothing")
def test_the_restart_reruns_the_same_command_in_the_same_process():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "HOPE_JAX_HUGE_PAGES")}
  env["PYTHONPATH"] = REPO
  out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=1"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
  pids = [l.split()[1] for l in out if l.startswith("before")]
  assert len(pids) == 2 and pids[0] == pids[1]  # Ran twice, as one process (execve).
  assert out[2] == f"after {pids[0]} glibc.malloc.hugetlb=1 True ['--flag=1']"
  # Turned off: one run, no tunable.
  env["HOPE_JAX_HUGE_PAGES"] = "0"
  out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=1"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
  assert out[0].startswith("before") and out[1].startswith("after") and "None False" in out[1]
