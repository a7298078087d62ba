"""`python -m hope_jax.train --config=experiments/base.py [--config.x.y=...]`."""

import signal
import sys

from absl import flags
from ml_collections import config_flags

from hope_jax import cli
from hope_jax.train import hugepages

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/*.py).", lock_config=True)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", "hope_jax.train")
  from hope_jax.train.loop import train  # Imported after flags: keeps --help fast.

  summary = train(_CONFIG.value)
  if summary["interrupted"]:  # The shell's convention: 128 + the signal (130: Ctrl-C).
    sys.exit(128 + (summary["stop_signal"] or signal.SIGINT))


if __name__ == "__main__":
  hugepages.restart_with_huge_pages()  # Before JAX starts: glibc reads it at process start.
  flags.FLAGS.unparse_flags()
  cli.run(main, prog="hope_jax.train")
