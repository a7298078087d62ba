"""tests/conftest.py's compile flags: a flag this XLA does not know is probed away, never set."""

from tests import conftest


def test_the_probe_accepts_a_known_xla_flag_and_refuses_an_unknown_one():
  # An unknown XLA_FLAGS entry aborts the process that reads it, so a probe that said yes to
  # anything would crash every test process under a jaxlib without the flag (0.12 and later).
  assert conftest._xla_accepts("--xla_backend_optimization_level=0")
  assert not conftest._xla_accepts("--xla_cpu_no_such_flag_for_hope_jax=true")
