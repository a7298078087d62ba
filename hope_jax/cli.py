"""Command-line plumbing shared by the entry points: clean one-line errors, exit status 2.

absl + ml_collections report a mistyped `--config.x.y` as a traceback; here every
bad input (unknown key, wrong type, missing file, impossible combination) ends the
program before any compilation with one line on stderr naming the key or path.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import app, flags

from hope_jax.config import ConfigError

_DID_YOU_MEAN = re.compile(r"'(?P<bad>[^'\n]+)'\s*Did you mean \"(?P<good>[^\"]+)\"")
_BAD_VALUE = re.compile(r"flag --(?P<key>[^=\s]+)=(?P<value>.*?): (?P<why>.*)", re.S)


def fail(message: str, prog: str | None = None) -> None:
  """Prints `prog: error: message` on stderr and exits with status 2."""
  prog = prog or os.path.basename(sys.argv[0]) or "hope_jax"
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def check_output_file(flag: str, path: str) -> None:
  """Raises ConfigError unless `path` can be created as a file: not a folder, its folder exists.

  Checked with the other flags, so a bad path fails before the work, not after it.
  """
  if os.path.isdir(path):
    raise ConfigError(f"{flag}: {path} is a folder; give a file path")
  folder = os.path.dirname(path)
  if folder and not os.path.isdir(folder):
    raise ConfigError(f"{flag}: folder {folder} does not exist (create it first)")


def _overrides(argv: list[str]) -> list[str]:
  return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def describe_flag_error(argv: list[str], err: BaseException) -> str:
  """Turns absl/ml_collections parsing errors into one readable sentence."""
  inner = err.args[0] if err.args and isinstance(err.args[0], KeyError) else err
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(err)
  m = _DID_YOU_MEAN.search(text)
  if m:
    bad, good = m.group("bad"), m.group("good")
    for path in _overrides(argv):
      parts = path.split(".")
      if bad in parts:
        i = parts.index(bad)
        key = ".".join(parts[1:i + 1])
        want = ".".join(parts[1:i] + [good])
        return f"unknown config key '{key}' (did you mean '{want}'?)"
    return f"unknown config key '{bad}' (did you mean '{good}'?)"
  if "get_config" in text:
    return f"cannot load config file {_config_path(argv, 'config')!r}: it defines no get_config()"
  if isinstance(err, (KeyError, AttributeError)) and _overrides(argv):
    return f"unknown config key in {_overrides(argv)}: {text.splitlines()[0]}"
  m = _BAD_VALUE.match(text)
  if m:
    key, value, why = m.group("key"), m.group("value"), " ".join(m.group("why").split())
    if key == "config":
      return f"cannot load config file {value!r}: {why}"
    # --config.a.b=... overrides a config key; anything else is a plain flag (sample's --top_k).
    name = f"config key '{key.removeprefix('config.')}'" if key.startswith("config.") else (
        f"flag --{key}")
    expected = re.search(r"(int|float|bool|boolean)", why)
    hint = f" (expected {expected.group(1)})" if expected else ""
    return f"bad value for {name}: {value!r}{hint}: {why}"
  return " ".join(text.split())


def _config_path(argv: list[str], name: str) -> str:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def run(main: Callable[[list[str]], None], prog: str, config_flag: str | None = "config") -> None:
  """`absl.app.run(main)` with clean flag errors and ConfigError -> exit 2.

  Args:
    main: the absl main function.
    prog: the program name used in error messages (e.g. "hope_jax.train").
    config_flag: name of an ml_collections config-file flag to load eagerly, so
      that a missing file or bad override is reported before any work starts.
  """

  def parser(argv):
    try:
      rest = flags.FLAGS(argv)
    except SyntaxError as e:
      fail(f"cannot load config file {e.filename}: syntax error at line {e.lineno}", prog)
    except Exception as e:  # absl, ml_collections and config-file errors of every kind.
      fail(describe_flag_error(argv, e), prog)
    if config_flag and config_flag in flags.FLAGS:
      try:
        value = flags.FLAGS[config_flag].value
        if value is not None:
          value.keys()  # Config files load lazily behind a proxy; force the load here.
      except OSError:
        fail(f"cannot load config file {_config_path(argv, config_flag)!r}: no such file", prog)
      except Exception as e:  # A broken config file: syntax error, no get_config(), ...
        fail(f"cannot load config file {_config_path(argv, config_flag)!r}: "
             f"{type(e).__name__}: {describe_flag_error(argv, e)}", prog)
      if value is None:
        fail(f"--{config_flag} is required, e.g. --{config_flag}=experiments/base.py", prog)
    return rest

  def guarded(argv):
    try:
      main(argv)
    except (ConfigError, FloatingPointError) as e:  # Bad input, or a diverged run (loop).
      fail(str(e), prog)

  app.run(guarded, flags_parser=parser)
