"""Transparent huge pages for XLA:CPU's buffers: the training CLI restarts itself with them.

XLA:CPU allocates every execution's temporaries afresh (1.5 GiB per device for the `hope`
step at D=256, 4 layers, L=512, B=8) through glibc's `malloc`, which maps allocations that
large anew each time. Where the kernel gives transparent huge pages only to memory that asks
for them (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, the usual default),
each step then faults in every 4 KiB page of those buffers again: 0.8 million page faults
and about a sixth of the step's CPU time as system time on a 2-core machine. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes `malloc` ask for huge pages, and the same
step ran 1.25x faster (docs/performance.md, "Huge pages").

glibc reads its tunables once, when a process starts, so `python -m hope_jax.train` restarts
itself (`os.execve`, the same process id, before JAX runs anything) with the tunable added to
`GLIBC_TUNABLES`. `HOPE_JAX_HUGE_PAGES=0` turns that off. Notebooks and the Python API run
in a process that already started: set the variable before starting Python or Jupyter,
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OFF_SWITCH = "HOPE_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def tunables_to_set(env: dict[str, str], system: str, libc: tuple[str, str],
                    mode: str | None) -> str | None:
  """The `GLIBC_TUNABLES` value to restart with, or None when a restart would not help.

  Args:
    env: the process environment.
    system: `platform.system()`.
    libc: `platform.libc_ver()`, e.g. `("glibc", "2.36")`.
    mode: `thp_mode()`.
  """
  if env.get(OFF_SWITCH, "1") == "0" or system != "Linux" or libc[0] != "glibc":
    return None
  try:
    version = tuple(int(p) for p in libc[1].split(".")[:2])
  except ValueError:
    return None
  # `always` already backs large mappings with huge pages; `never` refuses them.
  if version < (2, 35) or mode != "madvise":
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current:  # Set, by us before the restart or by the user.
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def restart_with_huge_pages() -> None:
  """Replaces this process with the same command and `glibc.malloc.hugetlb=1`, if it helps.

  Call it first thing in a `__main__`, before JAX has started: `sys.orig_argv` is rerun.
  """
  value = tunables_to_set(dict(os.environ), platform.system(), platform.libc_ver(), thp_mode())
  if value is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": value})


def active() -> bool:
  """Whether this process started with glibc's huge-page tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")
