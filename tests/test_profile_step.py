"""The step profiler: attribution of XLA operations, and a real trace of a tiny step."""

import glob
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


def test_summary_counts_each_operation_once_without_its_nested_events():
  hlo = "\n".join([
      '  %fusion.1 = f32[4] fusion(f32[4] %p), metadata={op_name="jit(train_step)/jvp(phase_a)/mul"}',
      '  %dot.2 = f32[4] dot(f32[4] %p), metadata={op_name="jit(train_step)/transpose(jvp(ffn))/dot"}',
  ])
  ev = lambda name, ts, dur, tid=1: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1,
                                     "tid": tid}
  events = [ev("ThunkExecutor::Execute", 0, 100),  # Bookkeeping around the operations.
            ev("fusion.1", 10, 30), ev("dot.2", 50, 40),
            ev("fusion.1", 0, 20, tid=2)]  # The same operation on the other thread.
  own = {(e["name"], e["tid"]): t for e, t in profile_step.exclusive_times(events)}
  assert own[("ThunkExecutor::Execute", 1)] == 30  # 100 less its two nested operations.
  table = profile_step.summarise(events, hlo, top=5)
  assert "busy time of the compute threads: 0.00 s in 3 operation runs" in table  # 90 us.
  assert "| forward | phase_a | 0.00 | 55.6% | 2 |" in table  # 50 of 90, run twice.
  assert "| outer backward | ffn | 0.00 | 44.4% | 1 |" in table
  assert "ThunkExecutor" not in table

  # A GPU trace: the device's kernels count (by name or by `args.hlo_op`), the host's
  # launches of the same operations do not.
  meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name",
                            "args": {"name": name}}
  gpu = [meta(1, "/host:CPU"), meta(7, "/device:GPU:0"), *events,
         {**ev("loop_fusion_kernel", 0, 60), "pid": 7, "args": {"hlo_op": "fusion.1"}},
         {**ev("dot.2", 100, 20), "pid": 7}, {**ev("sm90_gemm", 130, 20), "pid": 7}]
  table = profile_step.summarise(gpu, hlo, top=5)
  assert "busy time of the device's kernels: 0.00 s" in table
  assert "the largest: sm90_gemm (0.000 s)" in table  # Unattributed kernel time is shown.
  # 100 us of kernels between 0 and 150 us: the device's idle time shows.
  assert "device line 1: 3 kernels, mean 33.3 us; busy 0.000 s (summed 0.000 s) of the" in table
  assert "end (67%)" in table
  assert "| forward | phase_a | 0.00 | 75.0% |" in table  # 60 of 80.
  assert "| outer backward | ffn | 0.00 | 25.0% |" in table


def test_kernel_names_with_underscores_find_their_operation():
  ops = {"loop_add_fusion.12": "jit(train_step)/add"}
  assert profile_step._hlo_name({"name": "loop_add_fusion_12"}, ops) == "loop_add_fusion.12"
  assert profile_step._hlo_name({"name": "k", "args": {"hlo_op": "loop_add_fusion.12"}},
                                ops) == "loop_add_fusion.12"
  assert profile_step._hlo_name({"name": "loop_add_fusion_13"}, ops) is None


def test_profile_step_traces_a_tiny_hope_step(tmp_path):
  out = tmp_path / "trace"
  cmd = [sys.executable, "benchmarks/profile_step.py", "--set=hidden_size=32",
         "--set=num_layers=1", "--set=num_heads=2", "--set=chunk_other=4", "--set=chunk_mem=8",
         "--set=cms_chunks=[8,16]", "--set=inner_scan_unroll=1", "--batch=2", "--length=32",
         f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "hope: one step" in proc.stdout
  assert glob.glob(os.path.join(out, "plugins", "profile", "*", "*.xplane.pb"))
  # The tables come from JAX's own trace file, so every pass shows up without xprof.
  for row in ("| forward | phase_a |", "| CMS-write backward |", "| outer backward |"):
    assert row in proc.stdout, proc.stdout[-2000:]
  hlo = (out / "hlo.txt").read_text()
  for scope in ("phase_a", "phase_b", "ffn", "cms_write_grads"):
    assert scope in hlo, scope  # The named scopes the summary attributes time to.


def test_overlapping_device_events_are_neither_nested_nor_counted_twice():
  # Kernels on one stream whose timestamps overlap a little are successive, not nested: each
  # keeps its own time, and the line's busy time counts the overlap once.
  ev = lambda name, ts, dur: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": 1}
  events = [ev("a", 0, 10), ev("b", 9, 10), ev("c", 18, 10), ev("d", 40, 10)]
  own = {e["name"]: t for e, t in profile_step.exclusive_times(events)}
  assert own == {"a": 10, "b": 10, "c": 10, "d": 10}
  assert profile_step._union_us(events) == 38  # 0-28 and 40-50.
  (line,) = profile_step._device_lines(events)
  assert "4 kernels, mean 10.0 us; busy 0.000 s (summed 0.000 s) of the 0.000 s" in line
  assert line.endswith("(76%)")  # 38 of the 50 us span, not 40 of 50.
  # A truly nested event still comes off its parent's time.
  own = {e["name"]: t for e, t in profile_step.exclusive_times([ev("p", 0, 10), ev("k", 2, 5)])}
  assert own == {"p": 5, "k": 5}


def test_operations_without_an_op_name_take_their_operands():
  # XLA:CPU's YNNPACK fusions carry no metadata; before, their time was left out of the
  # tables (about half of a hope step's busy time).
  hlo = "\n".join([
      '  %mul.1 = f32[4] multiply(f32[4] %p, f32[4] %p), '
      'metadata={op_name="jit(train_step)/transpose(jvp(phase_b))/mul"}',
      '  %ynn_fusion.2 = f32[4] fusion(%mul.1, %p), kind=kCustom, calls=%fused_computation.2',
      '  %copy.3 = f32[4] copy(%ynn_fusion.2)',  # A chain of unnamed operations.
      '  %orphan.4 = f32[4] copy(%p)',  # Nothing named upstream: stays unattributed.
  ])
  names, inherited = profile_step.hlo_op_names(hlo)
  assert names["ynn_fusion.2"] == names["copy.3"] == "jit(train_step)/transpose(jvp(phase_b))/mul"
  assert inherited == {"ynn_fusion.2", "copy.3"}
  assert "orphan.4" not in names and "fused_computation.2" not in names
  ev = lambda name, ts, dur: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}
  table = profile_step.summarise([ev("mul.1", 0, 10), ev("ynn_fusion.2", 10, 20),
                                  ev("copy.3", 30, 10), ev("orphan.4", 40, 60)], hlo, top=5)
  assert "in 3 operation runs (0.00 s of it in operations without an op_name" in table
  assert "| outer backward | phase_b | 0.00 | 100.0% | 3 |" in table
  assert "| ynn_fusion | outer backward | phase_b | 0.00 | 50.0% | 1 |" in table


def test_operations_are_grouped_by_kind_of_work():
  c = profile_step.category
  assert c("ynn_fusion.7", "jit(train_step)/transpose(jvp(phase_a))/reduce_sum") == (
      "YNNPACK reductions")
  assert c("ynn_fusion.8", "jit(train_step)/jvp(phase_a)/dot_general") == c("dot.3", "x/mul") == (
      "products (and what YNNPACK fuses into them)")
  assert c("bitcast_dynamic-update-slice_fusion.2", "x/dynamic_update_slice") == (
      "the scans' slices and updates")
  assert c("ynn_fusion.9", "x/while/body/dynamic_slice") == (
      "products (and what YNNPACK fuses into them)")  # A product that reads a slice.
  assert c("copy_bitcast_fusion.4", "x/transpose") == c("copy.5", "x") == "copies and transposes"
  assert c("wrapped_broadcast.1", "x") == "broadcasts"
  assert c("multiply_tanh_fusion.3", "x/tanh") == "other elementwise and reduce operations"
  hlo = "\n".join([
      '  %ynn_fusion.1 = f32[4] fusion(%p), kind=kCustom, calls=%c.1, '
      'metadata={op_name="jit(train_step)/jvp(phase_a)/reduce_sum"}',
      '  %copy.2 = f32[4] copy(%p), metadata={op_name="jit(train_step)/jvp(phase_a)/copy"}',
  ])
  ev = lambda name, ts, dur: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}
  table = profile_step.summarise([ev("ynn_fusion.1", 0, 30), ev("copy.2", 30, 10),
                                  ev("ynn_fusion.1", 40, 30)], hlo, top=5)
  assert "| YNNPACK reductions | 0.00 | 85.7% | 2 |" in table
  assert "| copies and transposes | 0.00 | 14.3% | 1 |" in table
