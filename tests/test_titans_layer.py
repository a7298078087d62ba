"""The self-modifying Titans sublayer (spec §7 tests 2, 3, 8, 10; §5 streaming; causality).

Small config of spec §7: D=64, H=2, Dh=32, L=64, C_o=4, C_m=8. The models are made
"lively" (faster inner rates, stronger forgetting and momentum decay, larger
memory branches and output projection) so that the inner updates move the
outputs by far more than the tolerances: a wrong update cannot pass unnoticed.
"""

import dataclasses

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.titans import SelfModTitans

SMALL = ModelConfig(block="hope", hidden_size=64, num_heads=2, num_layers=2, chunk_other=4,
                    chunk_mem=8, cms_chunks=(8, 16, 32))
B, L = 2, 64


def make(seed=0, **overrides):
  """A SelfModTitans of the small config with lively inner dynamics."""
  model = SelfModTitans(dataclasses.replace(SMALL, **overrides), rngs=nnx.Rngs(seed))
  model.b_eta[...] = jnp.full_like(model.b_eta[...], 1.0)  # eta ~ 0.073.
  if model.cfg.use_alpha:
    model.b_alpha[...] = jnp.full_like(model.b_alpha[...], 1.0)  # alpha ~ 0.76.
  if model.cfg.momentum:
    model.b_beta[...] = jnp.zeros_like(model.b_beta[...])  # beta = 0.5.
  for name in ("proj_w1", "mem_w1"):
    if hasattr(model, name):
      getattr(model, name)[...] = 10.0 * getattr(model, name)[...]
  key = jax.random.PRNGKey(seed + 100)
  model.w_o.kernel[...] = jax.random.normal(key, model.w_o.kernel[...].shape) / 8.0
  return model


def inputs(seed=1, length=L, batch=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, SMALL.hidden_size))


def jit_forward(model, traces=None):
  graphdef, params = nnx.split(model)

  def run(p, u):
    if traces is not None:
      traces.append(u.shape)
    return nnx.merge(graphdef, p)(u)

  fwd = jax.jit(run)
  return lambda u: fwd(params, u)


@pytest.fixture(scope="module")
def model():
  return make()


FORWARD_TRACES = []


@pytest.fixture(scope="module")
def forward(model):
  return jit_forward(model, FORWARD_TRACES)


# --------------------------------------------------------------- test 2


def _loss_and_grads(model, u, proj, t_max):
  """A random projection of the outputs at positions <= t_max; grads wrt params and u."""
  graphdef, params = nnx.split(model)

  def loss(p, u):
    y = nnx.merge(graphdef, p)(u)
    return jnp.sum(jnp.where(jnp.arange(u.shape[1])[None, :, None] <= t_max, y * proj, 0.0))

  return jax.value_and_grad(loss, argnums=(0, 1))(params, u)


@pytest.fixture(scope="module")
def chunked_and_reference():
  u = inputs()
  proj = jax.random.normal(jax.random.PRNGKey(7), u.shape)
  chunked, ref = make(), make(impl="reference", remat=False)

  @jax.jit
  def both(u, proj):
    return (_loss_and_grads(chunked, u, proj, 40), _loss_and_grads(ref, u, proj, 40),
            chunked(u), ref(u))

  return both(u, proj)


def test_chunked_equals_reference_outputs_and_outer_grads(chunked_and_reference):
  (l_c, (g_c, gu_c)), (l_r, (g_r, gu_r)), y_c, y_r = chunked_and_reference
  assert float(jnp.std(y_c)) > 0.05  # Outputs of order 0.1: the tolerances below are tight.
  chex.assert_trees_all_close(y_c, y_r, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(l_c, l_r, rtol=1e-5)
  chex.assert_trees_all_close(g_c, g_r, atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(gu_c, gu_r, atol=1e-5, rtol=1e-4)
  # The meta-inits of the memories get a real gradient through the inner loop.
  assert float(jnp.abs(g_c["proj_w2"][...]).max()) > 1e-3


def test_outer_gradient_is_causal(chunked_and_reference):
  """d(outputs at t <= 40) / d(inputs at t > 40) is exactly zero, nonzero at t <= 40."""
  (_, (_, gu)), *_ = chunked_and_reference
  assert float(jnp.abs(gu[:, 41:]).max()) == 0.0
  assert float(jnp.abs(gu[:, 40]).min()) > 0.0


def _scan_unrolls(model, u):
  """The `unroll` of every scan in the traced forward pass (nested jaxprs included)."""
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p, u: nnx.merge(graphdef, p)(u))(params, u)
  out = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "scan":
        out.append((eqn.params["length"], eqn.params["unroll"]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return sorted(out)


@pytest.mark.parametrize("unroll", [2, 0])
def test_unrolled_chunk_scan_equals_the_loop(chunked_and_reference, unroll):
  # model.inner_scan_unroll runs several chunks per loop iteration (0: all of them): the
  # scans' unroll changes, the outputs and outer gradients do not.
  u = inputs()
  proj = jax.random.normal(jax.random.PRNGKey(7), u.shape)
  unrolled = make(inner_scan_unroll=unroll)
  # L=64 makes 16 chunks of C_o=4 (phase A) and 8 of C_m=8 (phase B).
  assert _scan_unrolls(make(), u) == [(8, 1), (16, 1)]
  assert _scan_unrolls(unrolled, u) == ([(8, 2), (16, 2)] if unroll else [(8, 8), (16, 16)])
  if not unroll:
    # Fully unrolled, the same body runs once per chunk: unroll=2 checks that the numbers do
    # not change; compiling all 24 chunks' forward and backward passes costs a minute more.
    return
  (l_c, (g_c, gu_c)), _, y_c, _ = chunked_and_reference
  (l_u, (g_u, gu_u)), y_u = jax.jit(
      lambda u, proj: (_loss_and_grads(unrolled, u, proj, 40), unrolled(u)))(u, proj)
  # Unrolled, XLA fuses and orders the sums differently: rounding-level differences (1.4e-6
  # on one gradient entry of 0.013 at 'highest' precision), as between chunked and reference.
  chex.assert_trees_all_close(y_u, y_c, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(l_u, l_c, rtol=1e-5)
  chex.assert_trees_all_close((g_u, gu_u), (g_c, gu_c), atol=1e-5, rtol=1e-4)


def test_inner_updates_move_the_fast_weights(model):
  graphdef, params = nnx.split(model)
  info = jax.jit(lambda p, u: nnx.merge(graphdef, p).inspect(u))(params, inputs())
  for name, drift in info["drift"].items():
    assert float(drift.min()) > 1e-2, name
  assert info["eta_BLH"].shape == (B, L, 2) and info["alpha_BLH"].shape == (B, L, 2)


@pytest.mark.parametrize("overrides", [dict(dgd_precond="per_layer", momentum=False),
                                       dict(static_projections=True, memory_target="v",
                                            dgd_precond="none", use_alpha=False)],
                         ids=["per_layer-nomomentum", "titans_lmm-noalpha"])
def test_chunked_equals_reference_variants(overrides):
  u = inputs(length=32)
  y_c = jit_forward(make(**overrides))(u)
  y_r = jit_forward(make(impl="reference", **overrides))(u)
  chex.assert_trees_all_close(y_c, y_r, atol=1e-5, rtol=1e-5)


# ------------------------------------------- against a literal reading of the spec


SPEC_CASES = {
    "default": ({}, 32),
    "c_o_above_c_m": (dict(chunk_other=16), 32),
    "dual-per_layer": (dict(read_mode="dual", dgd_precond="per_layer"), 24),
    "v_target-adaptive_q-no_dgd": (dict(memory_target="v", adaptive_q=True, dgd_precond="none"),
                                   24),
    "no_momentum-no_alpha": (dict(momentum=False, use_alpha=False), 24),
    # The spec's own chunks, whose C_m = 64 goes through the blocked DGD solve.
    "spec_chunks": (dict(chunk_other=16, chunk_mem=64), 128),
}


@pytest.mark.parametrize("overrides,length", SPEC_CASES.values(), ids=SPEC_CASES.keys())
def test_sublayer_equals_a_literal_float64_reading_of_the_spec(overrides, length):
  """Both paths share the model's equations; tests/spec_literal.py has none of its code."""
  from tests import spec_literal

  model, u = make(**overrides), inputs(length=length)
  got, want = np.asarray(jit_forward(model)(u)), spec_literal.sublayer(model, u)
  # float32 against float64: outputs up to ~0.4 differ by ~1.1e-7 in every case; a wrong
  # update rule, target or read moves them by more than 1e-4 (checked below for one).
  np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)
  if not overrides:  # The comparison can tell one rule from another.
    model.cfg = dataclasses.replace(model.cfg, memory_target="v")
    assert np.abs(got - spec_literal.sublayer(model, u)).max() > 1e-4


# ------------------------------------------------- read_mode="dual" (Eq. 86)


DUAL_VARIANTS = {
    "default": {},
    "per_layer-nomomentum": dict(dgd_precond="per_layer", momentum=False),
    "titans_lmm-noalpha": dict(static_projections=True, memory_target="v", dgd_precond="none",
                               use_alpha=False),
}


@pytest.mark.parametrize("overrides", DUAL_VARIANTS.values(), ids=DUAL_VARIANTS.keys())
def test_dual_chunked_equals_reference_outputs_and_outer_grads(overrides):
  """The closed-form dual reads equal the token scan reading W_run, with outer gradients."""
  u = inputs(length=32)
  proj = jax.random.normal(jax.random.PRNGKey(8), u.shape)
  chunked = make(read_mode="dual", **overrides)
  ref = make(read_mode="dual", impl="reference", remat=False, **overrides)
  run = jax.jit(lambda u, proj: (_loss_and_grads(chunked, u, proj, 20),
                                 _loss_and_grads(ref, u, proj, 20)))
  (l_c, (g_c, gu_c)), (l_r, (g_r, gu_r)) = run(u, proj)
  chex.assert_trees_all_close(l_c, l_r, rtol=1e-5)
  chex.assert_trees_all_close(g_c, g_r, atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(gu_c, gu_r, atol=1e-5, rtol=1e-4)
  # Causal: outputs at t <= 20 never depend on inputs at t > 20.
  assert float(jnp.abs(gu_c[:, 21:]).max()) == 0.0
  assert float(jnp.abs(gu_c[:, 20]).min()) > 0.0


def test_dual_streaming_equals_parallel():
  """Dual reads streamed token by token, and in uneven pieces, equal the chunked forward."""
  dual = make(read_mode="dual")
  graphdef, params = nnx.split(dual)
  step = jax.jit(lambda p, u, st: nnx.merge(graphdef, p).step(u, st))
  u = inputs(seed=2, length=32)
  y = jit_forward(dual)(u)
  for pieces in ([1] * 32, (8, 3, 21)):  # 8: chunked branch from a step's state.
    y_s, _ = stream(dual, lambda v, st: step(params, v, st), u, pieces)
    chex.assert_trees_all_close(y_s, y, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------- test 3


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_gelu_prime(x):
  t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)


def _np_recurrent_layer(m, u):
  """Eq. 86-88 + momentum token by token in float64 NumPy, with M_{t-1} everywhere."""
  cfg = m.cfg
  P = lambda a: np.asarray(a[...], np.float64)
  d, h, dh, g = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.inner_grad_clip
  u = np.asarray(u, np.float64)
  silu = lambda x: x / (1 + np.exp(-x))
  sig = lambda x: 1 / (1 + np.exp(-x))
  unit = lambda x: x / np.sqrt(np.sum(x * x) + 1e-6)

  def conv(x, name):
    w, b = P(getattr(m, f"conv_{name}_w")), P(getattr(m, f"conv_{name}_b"))
    xp = np.concatenate([np.zeros((x.shape[0], 3, d)), x], 1)
    return b + sum(w[j] * xp[:, j:j + x.shape[1]] for j in range(4))

  xt = silu(conv(u @ P(m.w_in.kernel), "x"))
  q_all = silu(conv(u @ P(m.w_q.kernel), "q"))
  beta = sig(u @ P(m.w_beta.kernel) + P(m.b_beta))
  out = np.zeros((u.shape[0], u.shape[1], h, dh))
  for b in range(u.shape[0]):
    for hd in range(h):
      sl = slice(hd * dh, (hd + 1) * dh)
      mems = {n: [P(m.proj_w1)[hd, i], P(m.proj_w2)[hd, i]] for i, n in enumerate(m.names)}
      mems["mem"] = [P(m.mem_w1)[hd, 0], P(m.mem_w2)[hd, 0]]
      mom = {n: [np.zeros_like(w1), np.zeros_like(w2)] for n, (w1, w2) in mems.items()}
      apply = lambda n, x, mems=mems: x + mems[n][0] @ _np_gelu(mems[n][1] @ x)
      for t in range(u.shape[1]):
        x = xt[b, t, sl]
        k, v = unit(apply("k", x)), apply("v", x)
        eta = cfg.eta_max * sig(P(m.r_eta)[hd] @ apply("eta", x) + P(m.b_eta)[hd])
        alpha = cfg.alpha_min + (1 - cfg.alpha_min) * sig(
            P(m.r_alpha)[hd] @ apply("alpha", x) + P(m.b_alpha)[hd])
        q = unit(q_all[b, t, sl])
        out[b, t, hd] = apply("mem", q)
        targets = {n: apply(n, v) for n in mems}
        for n, (w1, w2) in list(mems.items()):
          z = w2 @ k
          hh = _np_gelu(z)
          e = k + w1 @ hh - targets[n]
          delta = (w1.T @ e) * _np_gelu_prime(z)
          e = e * min(1.0, g / (np.linalg.norm(e) * np.linalg.norm(hh)))
          delta = delta * min(1.0, g / np.linalg.norm(delta))
          s1 = beta[b, t, hd] * mom[n][0] - eta * np.outer(e, hh)
          s2 = beta[b, t, hd] * mom[n][1] - eta * np.outer(delta, k)
          mom[n] = [s1, s2]
          mems[n] = [alpha * w1 + s1,
                     w2 @ (alpha * np.eye(dh) - eta * np.outer(k, k)) + s2]
  o = out / np.sqrt(np.mean(out * out, -1, keepdims=True) + 1e-6) * P(m.out_scale)
  o = o.reshape(u.shape[0], u.shape[1], d)
  gate = u @ P(m.w_g.kernel)
  return (o * silu(gate)) @ P(m.w_o.kernel)


def test_chunk_one_is_the_fully_recurrent_model():
  """Spec §7.3: C_o = C_m = 1 equals the token loop of Eq. 86-88 with M_{t-1}."""
  m = make(chunk_other=1, chunk_mem=1)
  u = inputs(length=12, batch=1)
  np.testing.assert_allclose(np.asarray(jit_forward(m)(u)), _np_recurrent_layer(m, u),
                             atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------- test 8


# Table 6 switches of this sublayer (spec §4): outputs and compiled program change.
TABLE6 = {
    "wo_dgd": (dict(dgd_precond="none"), {}),
    "wo_momentum": (dict(momentum=False), {}),
    "wo_weight_decay": (dict(use_alpha=False), {}),
    "wo_inner_k": (dict(frozen_memories=("k",)), {}),
    "wo_inner_v": (dict(frozen_memories=("v",)), {}),
    "wo_inner_q": (dict(adaptive_q=True, frozen_memories=("q",)), dict(adaptive_q=True)),
    "inner_q": (dict(adaptive_q=True), {}),  # Table 6 row 1 vs our default (spec §0.2).
}
# Every other §9 switch of the sublayer must at least change the traced program.
OTHER_SWITCHES = [
    dict(dgd_precond="per_layer"), dict(memory_target="v"), dict(read_mode="dual"),
    dict(conv_position="post_memory"), dict(chunk_other=8), dict(chunk_mem=16),
    dict(mem_hidden_proj=16), dict(mem_hidden_mem=64), dict(static_projections=True),
    dict(impl="reference"),
]
GRAD_ONLY_SWITCHES = [dict(remat=False), dict(selfmod_meta_grad="first_order")]


def _jaxpr(model, u, grad=False):
  graphdef, params = nnx.split(model)
  f = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x))
  return str(jax.make_jaxpr(jax.grad(f) if grad else f)(params, u))


@pytest.mark.parametrize("name", list(TABLE6))
def test_table6_switch_changes_outputs_and_jaxpr(name, model, forward):
  """Spec §7.8: each Table 6 switch moves the outputs by > 1e-4 and changes the jaxpr."""
  u = inputs()
  on, off = TABLE6[name]
  base = make(**off) if off else model
  y_base = jit_forward(base)(u) if off else forward(u)
  switched = make(**on)
  assert float(jnp.max(jnp.abs(jit_forward(switched)(u) - y_base))) > 1e-4
  assert _jaxpr(switched, u) != _jaxpr(base, u)


def test_every_other_switch_changes_the_jaxpr(model):
  """The remaining §9 switches change the traced program (meta-grad and remat: its gradient)."""
  u = inputs(length=16)
  base = _jaxpr(model, u)
  for on in OTHER_SWITCHES:
    assert _jaxpr(make(**on), u) != base, on
  base_grad = _jaxpr(model, u, grad=True)
  for on in GRAD_ONLY_SWITCHES:
    assert _jaxpr(make(**on), u, grad=True) != base_grad, on
  ident = dict(num_heads=1, memory_input="identity")
  assert _jaxpr(make(**ident), u) != _jaxpr(make(num_heads=1), u)


# --------------------------------------------------------------- test 10


def test_batch_independence(forward):
  """Spec §7.10: permuting the batch permutes outputs; other samples cannot leak in."""
  u = inputs()
  y = forward(u)
  perm = jnp.array([1, 0])
  chex.assert_trees_all_close(forward(u[perm]), y[perm], atol=1e-6)
  u_alt = u.at[1].set(inputs(seed=5, batch=1)[0])
  y_alt = forward(u_alt)
  chex.assert_trees_all_close(y_alt[0], y[0], atol=1e-6)
  assert float(jnp.max(jnp.abs(y_alt[1] - y[1]))) > 1e-3


# ------------------------------------------------- padding, streaming, compiles


STEP_TRACES = []


@pytest.fixture(scope="module")
def step(model):
  graphdef, params = nnx.split(model)

  def run(p, u, state):
    STEP_TRACES.append(u.shape)
    return nnx.merge(graphdef, p).step(u, state)

  fn = jax.jit(run)
  return lambda u, state: fn(params, u, state)


def stream(model, step, u, pieces):
  state, ys, pos = model.init_state(u.shape[0], u.shape[1]), [], 0
  for n in pieces:
    y, state = step(u[:, pos:pos + n], state)
    ys.append(y)
    pos += n
  return jnp.concatenate(ys, axis=1), state


@pytest.fixture(scope="module")
def streamed_one_by_one(model, step):
  u = inputs()
  return (u, *stream(model, step, u, [1] * L))


def test_streaming_token_by_token_equals_parallel(streamed_one_by_one, forward):
  u, y_stream, state = streamed_one_by_one
  chex.assert_trees_all_close(y_stream, forward(u), atol=1e-5, rtol=1e-5)
  assert int(state["pos"]) == L
  # The state does not grow with max_len: only fast weights, conv rows and pos.
  shapes = lambda st: [a.shape for a in jax.tree.leaves(st)]
  assert shapes(state) == shapes(make().init_state(B, 100 * L))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state) if a.ndim)


def test_padded_length_equals_unpadded_prefix(streamed_one_by_one, forward):
  """L = 61 is padded to the chunk grid; the padding cannot change real tokens."""
  u, y_stream, _ = streamed_one_by_one
  y61 = forward(u[:, :61])
  assert y61.shape == (B, 61, SMALL.hidden_size)
  chex.assert_trees_all_close(y61, forward(u)[:, :61], atol=1e-6)
  chex.assert_trees_all_close(y61, y_stream[:, :61], atol=1e-5, rtol=1e-5)


def test_streaming_uneven_pieces_equals_parallel(model, step, forward):
  """Pieces 3 + 8 (an aligned length off the chunk grid: token branch) + 53."""
  u = inputs(seed=2)
  y, _ = stream(model, step, u, (3, 8, 53))
  chex.assert_trees_all_close(y, forward(u), atol=1e-5, rtol=1e-5)


def test_chunked_path_compiles_once_per_shape(model, step, forward):
  """The model-level scan's use: aligned pieces of 8 take the chunked branch, one program."""
  for seed in (3, 4):
    u = inputs(seed=seed)
    before = len(STEP_TRACES)
    y, _ = stream(model, step, u, [8] * (L // 8))
    chex.assert_trees_all_close(y, forward(u), atol=1e-5, rtol=1e-5)
    assert STEP_TRACES.count((B, 8, SMALL.hidden_size)) == 1, STEP_TRACES
    assert len(STEP_TRACES) - before <= 1
  assert FORWARD_TRACES.count((B, L, SMALL.hidden_size)) == 1


def test_layers_of_one_shape_share_one_trace_of_each_phase(monkeypatch):
  """Every layer (all of one shape) reuses the first layer's trace of each phase, and its
  linearised and transposed forms too (the layer loop's block calls and `run_phase_bh` are
  jitted for their trace caches); another step of the same shapes traces no phase again."""
  from hope_jax import build_model
  from hope_jax.ops import selfmod

  traced = []
  scan = selfmod.scan_chunked
  monkeypatch.setattr(selfmod, "scan_chunked",
                      lambda spec, body, *a: traced.append(body.__name__) or scan(spec, body, *a))
  counts = []
  # (Batch 3 and these lengths are this test's own: no other test fills the cache for them.)
  for layers, length in ((1, 24), (3, 40)):
    traced.clear()
    cfg = dataclasses.replace(SMALL, num_layers=layers, vocab_size=32, cms_signal="static")
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    tokens = jnp.zeros((3, length), jnp.int32)
    loss = lambda p, g=graphdef, t=tokens: nnx.merge(g, p)(t).sum()
    jax.jit(jax.grad(loss)).trace(params)
    counts.append(sorted(traced))
  assert counts[0] and counts[1] == counts[0], counts
  assert set(counts[0]) == {"phase_a_body", "phase_b_body"}, counts
  traced.clear()  # The forward alone (a new function, new block calls): phases from the cache.
  jax.jit(lambda p, g=graphdef, t=tokens: nnx.merge(g, p)(t)).trace(params)
  assert traced == [], traced


def test_titans_lmm_language_model_trains_one_step():
  """block='titans_lmm' builds SelfModTitans with static projections + SwiGLU."""
  import optax

  from experiments import titans_lmm
  from hope_jax import build_model

  cfg = titans_lmm.get_config()
  cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads = 32, 1, 2
  cfg.model.chunk_other, cfg.model.chunk_mem = 4, 8
  lm = build_model(cfg.model)
  mixer = lm.blocks[0].mixer
  assert isinstance(mixer, SelfModTitans) and not mixer.spec.live and hasattr(mixer, "w_k")
  graphdef, params = nnx.split(lm)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 17), 0, cfg.model.vocab_size)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("overrides", [{}, dict(conv_position="post_memory"),
                                       dict(static_projections=True, memory_target="v")],
                         ids=["default", "post_memory", "titans_lmm"])
def test_read_and_update_split_the_step(overrides):
  # Where `splits` holds (one main-memory chunk read at its start, static q), `read` gives
  # the step's outputs and `update` its new state, from a state in mid-sequence.
  model = make(**overrides)
  c = model.cfg.chunk_mem
  assert model.splits(c) and not model.splits(2 * c)
  assert not make(read_mode="dual", **overrides).splits(c)
  if "static_projections" not in overrides:
    assert not make(adaptive_q=True, **overrides).splits(c)
  graphdef, params = nnx.split(model)

  def run(p, u_BLD):
    m = nnx.merge(graphdef, p)
    _, state = m.step(u_BLD[:, :c], m.init_state(B, L), aligned=True)
    y_BLD, new = m.step(u_BLD[:, c:2 * c], state, aligned=True)
    split = m.read(u_BLD[:, c:2 * c], state), m.update(u_BLD[:, c:2 * c], state)
    return state, (y_BLD, new), split

  state, want, got = jax.jit(run)(params, inputs(length=2 * c))
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  assert float(jnp.abs(got[1]["mem"]["W1_run"] - state["mem"]["W1_run"]).max()) > 1e-3
