"""The step profiler: attribution of XLA operations, and a real trace of a tiny step."""

import glob
import json
import os
import subprocess
import sys

from benchmarks import profile_step
from tests.conftest import REPO


def test_classify_reads_pass_and_part_from_op_names():
  c = profile_step.classify
  assert c("jit(train_step)/jvp()/while/body/closed_call/jvp(phase_a)/vmap(vmap())/dot_general"
           ) == ("forward", "phase_a")
  assert c("jit(train_step)/transpose(jvp())/while/body/jvp(phase_b)/checkpoint/"
           "rematted_computation/vmap()/tanh") == ("outer backward (remat)", "phase_b")
  assert c("jit(train_step)/jvp()/while/body/closed_call/cms_write_grads/transpose(jvp(ffn))/"
           "dot_general") == ("CMS-write backward", "ffn")
  assert c("jit(train_step)/add") == ("forward", "other")


def test_summary_counts_each_operation_once_without_its_nested_events(tmp_path):
  hlo = "\n".join([
      '  %fusion.1 = f32[4] fusion(f32[4] %p), metadata={op_name="jit(train_step)/jvp(phase_a)/mul"}',
      '  %dot.2 = f32[4] dot(f32[4] %p), metadata={op_name="jit(train_step)/transpose(jvp(ffn))/dot"}',
  ])
  ev = lambda name, ts, dur, tid=1: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1,
                                     "tid": tid}
  events = [ev("ThunkExecutor::Execute", 0, 100),  # Bookkeeping around the operations.
            ev("fusion.1", 10, 30), ev("dot.2", 50, 40),
            ev("fusion.1", 0, 20, tid=2)]  # The same operation on the other thread.
  trace = tmp_path / "trace.json"
  trace.write_text(json.dumps({"traceEvents": events}))
  own = {(e["name"], e["tid"]): t for e, t in profile_step.exclusive_times(events)}
  assert own[("ThunkExecutor::Execute", 1)] == 30  # 100 less its two nested operations.
  table = profile_step.summarise(str(trace), hlo, top=5)
  assert "busy time of the compute threads: 0.00 s" in table  # 90 microseconds.
  assert "| forward | phase_a | 0.00 | 55.6% |" in table  # 50 of 90.
  assert "| outer backward | ffn | 0.00 | 44.4% |" in table
  assert "ThunkExecutor" not in table


def test_profile_step_traces_a_tiny_hope_step(tmp_path):
  out = tmp_path / "trace"
  cmd = [sys.executable, "benchmarks/profile_step.py", "--set=hidden_size=32",
         "--set=num_layers=1", "--set=num_heads=2", "--set=chunk_other=4", "--set=chunk_mem=8",
         "--set=cms_chunks=[8,16]", "--batch=2", "--length=32", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "hope: one step" in proc.stdout
  assert glob.glob(os.path.join(out, "plugins", "profile", "*", "*.xplane.pb"))
  hlo = (out / "hlo.txt").read_text()
  for scope in ("phase_a", "phase_b", "ffn", "cms_write_grads"):
    assert scope in hlo, scope  # The named scopes the summary attributes time to.
