"""Pure JAX operations (no Flax): every fast path sits next to a plain reference."""
