"""The training loop learns, is deterministic, and the LM is causal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hope_jax.config import ModelConfig
from hope_jax.train.loop import train


def _tiny(tmp_path, tiny_config, **training):
  cfg = tiny_config
  cfg.training.checkpoint_dir = str(tmp_path / "ckpt")
  cfg.training.progress_bar = False
  for k, v in training.items():
    cfg.training[k] = v
  return cfg


def test_tiny_run_reduces_loss_on_default_corpus(tmp_path, tiny_config):
  out = train(_tiny(tmp_path, tiny_config))
  losses = [l for _, l in out["losses"]]
  assert out["step"] == 30 and len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert out["eval"]["eval/loss"] < np.log(256) - 1.0
  assert (tmp_path / "ckpt" / "logs" / "metrics.jsonl").exists()
  assert list((tmp_path / "ckpt" / "logs" / "tensorboard").iterdir())


def test_same_seed_same_losses(tmp_path, tiny_config):
  a = train(_tiny(tmp_path / "a", tiny_config, num_steps=8))
  b = train(_tiny(tmp_path / "b", tiny_config, num_steps=8))
  assert a["losses"] == b["losses"]
  c = train(_tiny(tmp_path / "c", tiny_config, num_steps=8, seed=1))
  assert a["losses"] != c["losses"]


@pytest.mark.parametrize("block", ["transformer_pp"])
def test_lm_is_causal(block):
  import hope_jax

  cfg = ModelConfig(block=block, hidden_size=32, num_layers=2, num_heads=2)
  model = hope_jax.build_model(cfg, seed=0)
  L, t = 12, 5
  x = jax.random.normal(jax.random.key(0), (1, L, 32))

  def out_t(x_BLD):
    h = x_BLD
    for blk in model.blocks:
      h = blk(h)
    return h[0, t].sum()

  g = jax.grad(out_t)(x)
  assert jnp.all(g[0, t + 1:] == 0.0)
  assert jnp.any(g[0, : t + 1] != 0.0)
