"""HOPE vs Titans-LMM vs Transformer++ at equal parameters and equal training tokens.

Run (prints validation bits per byte and MQAR accuracy side by side):
  python -m experiments.compare                # the full setting (< 1 h on 2 CPU cores)
  python -m experiments.compare --tiny         # seconds; what the tests run

Each model file here (`hope.py`, `titans_lmm.py`, `transformer_pp.py`) is also an
ordinary experiment config for `python -m hope_jax.train --config=...`.
"""
