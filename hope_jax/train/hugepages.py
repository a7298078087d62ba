"""Transparent huge pages for XLA:CPU's buffers: the training CLI restarts itself with them.

XLA:CPU allocates every execution's temporaries afresh (1.54 GiB per device for the `hope`
step at D=256, 4 layers, L=512, B=8) through glibc's `malloc`, which maps allocations that
large anew each time. Where the kernel gives transparent huge pages only to memory that asks
for them (`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, the usual default),
each step then faults in every 4 KiB page of those buffers again: 0.8 million page faults
and about a sixth of the step's CPU time as system time on a 2-core machine. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes `malloc` ask for huge pages; the same step
ran 1.09-1.25x faster (docs/performance.md, "Huge pages").

glibc reads its tunables once, when a process starts, so `python -m hope_jax.train` restarts
itself (`os.execve`: the same process id and command line, before JAX starts) with the
tunable added to `GLIBC_TUNABLES`, when training will run on the CPU: not when `JAX_PLATFORMS`
names no `cpu`, nor, without it, when a GPU or TPU plugin of JAX is installed.
`HOPE_JAX_HUGE_PAGES=0` turns the restart off. Processes that training starts inherit the
variable. Notebooks and the Python API run in a process that has already started: set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before starting Python or Jupyter.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OFF_SWITCH = "HOPE_JAX_HUGE_PAGES"
RESTARTED = "_HOPE_JAX_HUGE_PAGES_RESTARTED"  # One restart at most, whatever drops the tunable.
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


def accelerator_installed() -> bool:
  """Whether JAX would find a GPU or TPU here: looked up where JAX looks, nothing imported.

  JAX loads the plugins (CUDA, ROCm) that the `jax_plugins` entry points name or that sit in
  the `jax_plugins` namespace package, and a TPU's runtime from `libtpu`.
  """
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  namespace = importlib.util.find_spec("jax_plugins")
  return bool(namespace and namespace.submodule_search_locations
              and any(pkgutil.iter_modules(namespace.submodule_search_locations)))


def tunables_to_set(env: dict[str, str], system: str, libc: tuple[str, str],
                    mode: str | None, accelerator: bool = False) -> str | None:
  """The `GLIBC_TUNABLES` value to restart with, or None when a restart would not help.

  Args:
    env: the process environment.
    system: `platform.system()`.
    libc: `platform.libc_ver()`, e.g. `("glibc", "2.36")`.
    mode: `thp_mode()`.
    accelerator: `accelerator_installed()`; JAX then trains on it unless `JAX_PLATFORMS`
      puts the CPU first.
  """
  if env.get(OFF_SWITCH, "1") == "0" or env.get(RESTARTED):
    return None
  if system != "Linux" or libc[0] != "glibc":
    return None
  try:
    version = tuple(int(p) for p in libc[1].split(".")[:2])
  except ValueError:
    return None
  # `always` already backs large mappings with huge pages; `never` refuses them.
  if version < (2, 35) or mode != "madvise":
    return None
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  on_cpu = platforms[0] == "cpu" if platforms else not accelerator
  if not on_cpu:  # Training runs on a GPU or TPU, whose buffers are not glibc's.
    return None
  current = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current:  # Set, by us before the restart or by the user.
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def tunables_here(env: dict[str, str]) -> str | None:
  """`tunables_to_set` for `env` on this machine (its system, libc, kernel and plugins)."""
  return tunables_to_set(env, platform.system(), platform.libc_ver(), thp_mode(),
                         accelerator_installed())


def module_run(orig_argv: list[str]) -> str | None:
  """The module the interpreter itself runs with `-m` (`sys.orig_argv`), or None.

  `python -m pdb -m hope_jax.train` runs pdb, and a script or `-c` runs no module.
  """
  args = iter(orig_argv[1:])
  for arg in args:
    if arg == "-m":
      return next(args, None)
    if arg.startswith("-m"):
      return arg[2:]
    if arg in ("-X", "-W", "--check-hash-based-pycs"):
      next(args, None)  # The option's value.
    elif arg == "-c" or not arg.startswith("-"):
      return None
  return None


def restart_with_huge_pages(module: str = "hope_jax.train") -> None:
  """Replaces this process with the same command and `glibc.malloc.hugetlb=1`, if it helps.

  Call it first thing in the `__main__` of `module`, before JAX has started: the command
  (`sys.orig_argv`) is rerun only when it is `python ... -m module ...` with no tracer or
  debugger attached. A failed restart is reported on stderr and training goes on without.
  """
  if (not sys.executable or module_run(list(sys.orig_argv)) != module
      or sys.gettrace() is not None):
    return
  value = tunables_here(dict(os.environ))
  if value is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv,
              {**os.environ, "GLIBC_TUNABLES": value, RESTARTED: "1"})
  except OSError as e:
    print(f"{module}: note: could not restart with {TUNABLE} ({e}); going on without it",
          file=sys.stderr, flush=True)


def active() -> bool:
  """Whether this process started with glibc's huge-page tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")
