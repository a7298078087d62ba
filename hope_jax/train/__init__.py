"""Training: state, optimizer, jitted steps and the loop behind `python -m hope_jax.train`."""
