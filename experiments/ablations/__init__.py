"""Table 6 ablations of HOPE: each file holds only its overrides on experiments/hope.py."""
