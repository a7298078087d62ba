"""Agreement between the processes of a multi-process run on what only some of them saw.

Process 0 alone locks and cleans the checkpoint folder and writes the logs; each process
reads only its own shards of a checkpoint. When such a step fails on some processes, all of
them must act on it together: a process that raised alone left the others waiting in their
next collective, or paired its collectives with different ones of theirs (a checksum of
another step). Each function here is one all-gather that every process must enter, so it is
also a barrier; with one process it gathers nothing.
"""

from __future__ import annotations

import jax
import numpy as np

from hope_jax.config import ConfigError


def gather_codes(code: int) -> list[int]:
  """Every process's `code` (a small int), in process order: the same list everywhere."""
  if jax.process_count() == 1:
    return [int(code)]
  from jax.experimental import multihost_utils

  return [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel()]


def failed_processes(error: BaseException | None) -> list[int]:
  """The indices of the processes whose `error` is set."""
  return [i for i, c in enumerate(gather_codes(error is not None)) if c]


def raise_if_any_failed(error: BaseException | None, elsewhere: str,
                        exc_type: type[ConfigError] = ConfigError) -> None:
  """Raises `error` where it happened and `exc_type(elsewhere)` on the other processes.

  Args:
    error: this process's error, or None.
    elsewhere: what went wrong, for the processes where it did not happen; `{failed}` in it
      becomes the failed processes' indices.
    exc_type: the error the other processes raise.
  """
  failed = failed_processes(error)
  if error is not None:
    raise error
  if failed:
    raise exc_type(elsewhere.replace("{failed}", ", ".join(map(str, failed))))
