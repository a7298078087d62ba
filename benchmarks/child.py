"""One benchmark row in a child process: its own JAX, caches and peak RSS.

The child prints its row as one `ROW {json}` line on stdout (`emit`); its stderr, progress and
any traceback go straight to the parent's. `run_row` runs the child and returns that row, or
`{"error": ...}` when it fails or runs out of time, so one bad row never stops a table.
"""

from __future__ import annotations

import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(row: dict) -> None:
  """Prints the child's result for `run_row`."""
  print("ROW " + json.dumps(row), flush=True)


def run_row(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
  """Runs `cmd` from the repository root; its emitted row, or {"error": why}."""
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"no result within --timeout={timeout:g} s"}
  found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
  if proc.returncode or not found:
    return {"error": f"exit {proc.returncode} (its traceback is on stderr)"}
  return json.loads(found[-1])
