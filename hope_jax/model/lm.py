"""The language-model skeleton shared by every block type (spec §4), and streaming decode (§5).

  tokens -> embedding -> N x block -> final RMSNorm -> logits (tied embedding)

A block is a pre-norm residual sequence mixer followed by a feed-forward part:
  transformer_pp:  x += Attention(norm x);  x += SwiGLU(norm x)
  titans_lmm:      x += SelfModTitans(norm x) [static projections];  x += SwiGLU(norm x)
  hope:            x += SelfModTitans(norm x);  x = CMS(x)
  hope_attention:  x += Attention(norm x);  x = CMS(x)

Two forward paths give the same logits:
  * static CMS (or no CMS): every block runs on the whole sequence in parallel;
  * `cms_signal="lm_grad"`: a model-level `lax.scan` over chunks of C_1 tokens (spec §3.3).
    Its carry holds every layer's mixer state (`init_state`/`step`) and CMS fast state.
    Per chunk: forward all layers from the carried state, take the chunk's summed
    next-token CE (token t's target is token t+1; the last position has none) and its
    `jax.vjp` w.r.t. the CMS deltas only, from the same forward pass
    (`chunk_forward_and_grads`; `lm_grad_fused=False` recomputes the chunk on a
    stop-gradient copy instead); then `hope_jax.ops.cms.schedule_update` writes the levels
    whose boundary ends this chunk.
`init_cache`/`decode_step` carry the same state token by token; a CMS boundary write is
applied when the next token (which supplies the last target) arrives, by recomputing the
finished chunk from a snapshot of the mixer states at its start.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hope_jax.config import ModelConfig
from hope_jax.model.attention import Attention
from hope_jax.model.cms import has_fast_weights
from hope_jax.model.layers import DTYPES, Linear, RMSNorm, SwiGLU, normal
from hope_jax.ops import cms as cms_ops


def _mixer(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.block in ("transformer_pp", "hope_attention"):
    return Attention(cfg, rngs=rngs)
  from hope_jax.model.titans import SelfModTitans  # Self-modifying Titans (spec §2).

  return SelfModTitans(cfg, rngs=rngs)


class Block(nnx.Module):
  """One residual block: sequence mixer, then SwiGLU (or CMS for HOPE blocks)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = DTYPES[cfg.param_dtype]
    self.norm_mixer = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.mixer = _mixer(cfg, rngs)
    self.uses_cms = cfg.block in ("hope", "hope_attention")
    if self.uses_cms:
      from hope_jax.model.cms import CMS  # Continuum Memory System (spec §3).

      self.ffn = CMS(cfg, rngs=rngs)
    else:
      self.norm_ffn = RMSNorm(cfg.hidden_size, param_dtype=pd)
      self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_width, num_layers=cfg.num_layers, rngs=rngs,
                        dtype=DTYPES[cfg.dtype], param_dtype=pd)

  def _ffn(self, x_BLD, delta=None):
    with jax.named_scope("ffn"):
      if self.uses_cms:
        return self.ffn(x_BLD, None if delta is None else {"delta": delta})
      return x_BLD + self.ffn(self.norm_ffn(x_BLD))

  def __call__(self, x_BLD):
    return self._ffn(x_BLD + self.mixer(self.norm_mixer(x_BLD)))

  def step(self, x_BLD, state, delta=None, aligned: bool = False):
    """The block on a piece of tokens that follows `state` (the mixer's recurrent state)."""
    y_BLD, state = self.mixer.step(self.norm_mixer(x_BLD), state, aligned=aligned)
    return self._ffn(x_BLD + y_BLD, delta), state

  def read_step(self, x_BLD, state, delta=None):
    """`step`'s output on an aligned piece where `mixer.splits` holds, and the mixer's
    input u_BLD, from which `update_step` gives `step`'s new state."""
    u_BLD = self.norm_mixer(x_BLD)
    return self._ffn(x_BLD + self.mixer.read(u_BLD, state), delta), u_BLD

  def update_step(self, u_BLD, state):
    return self.mixer.update(u_BLD, state)


def _snapshot(mixer, state):
  """What the boundary recompute needs of a mixer state; a KV cache is append-only, so its
  position suffices (entries past it are masked and rewritten)."""
  return {"pos": state["pos"]} if isinstance(mixer, Attention) else state


def _restore(mixer, current, snap):
  return {**current, "pos": snap["pos"]} if isinstance(mixer, Attention) else snap


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_call(fn, graphdef, block_vars, x_BLD, item):
  """`fn(block, x_BLD, item)`, jitted for its trace cache: inside a traced step XLA inlines
  the call, and the other blocks of the same structure (same `graphdef`, same shapes) reuse
  the first one's jaxpr and its linearised and transposed forms instead of tracing again."""
  return fn(nnx.merge(graphdef, block_vars), x_BLD, item)


def _stack(trees):
  """Per-layer pytrees (same structure) -> one pytree with a leading layer axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int, axis: int = 0):
  """The inverse of `_stack` along `axis`: a list of `n` pytrees."""
  return [jax.tree.map(lambda a, i=i: jnp.take(a, i, axis=axis), tree) for i in range(n)]


def _kept(levels: Sequence, frozen: tuple) -> list:
  """The entries of a per-level sequence whose level is not in `frozen`."""
  return [x for i, x in enumerate(levels) if i not in frozen]


def _drop_levels(fast, frozen: tuple):
  """A layer's CMS fast state ({"delta": [levels], "acc": [levels]}) without `frozen` levels."""
  return {k: _kept(lvls, frozen) for k, lvls in fast.items()} if frozen else fast


def _with_levels(kept: list, held: list, frozen: tuple) -> list:
  """Every level's deltas in level order: `kept` ones and, at the `frozen` places, `held`."""
  if not frozen:
    return kept
  n = len(frozen) + len(kept)
  kept, held = iter(kept), iter(held)
  return [next(held) if i in frozen else next(kept) for i in range(n)]


def _grouped_scan(body, carry, xs, every: int):
  """`lax.scan(body, carry, xs)` that keeps the carry for the backward pass every `every` steps.

  With every = R > 1 the steps run in groups of R, each group a rematerialised inner scan
  (spec §2.9): the backward pass keeps the carry at the n/R group starts and recomputes one
  group at a time, so it holds n/R + R (+ n mod R) steps' residuals instead of n, for running
  every step's forward part once more (for the fused `lm_grad` body that includes the CMS
  write's inner backward pass; under `lm_grad_fused=False` with `remat`, whose body is
  already rematerialised, the forward then runs three times). Leftover steps (n mod R) run
  in a plain scan after the groups. The result is the plain scan's, recomputed.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  if every <= 1 or n <= every:
    return jax.lax.scan(body, carry, xs)
  groups = n // every
  head = jax.tree.map(lambda a: a[:groups * every].reshape(groups, every, *a.shape[1:]), xs)
  # (prevent_cse=False: the scan already keeps XLA from merging the recomputation away.)
  group = jax.checkpoint(lambda c, x: jax.lax.scan(body, c, x), prevent_cse=False)
  carry, ys = jax.lax.scan(group, carry, head)
  ys = jax.tree.map(lambda a: a.reshape(groups * every, *a.shape[2:]), ys)
  if n % every:
    carry, ys_tail = jax.lax.scan(body, carry, jax.tree.map(lambda a: a[groups * every:], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
  return carry, ys


def _zero_cotangent(x):
  """A zero cotangent for `x` (float0 for integer leaves such as positions)."""
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return jnp.zeros(x.shape, jax.dtypes.float0)


def _add_cotangents(a, b):
  """a + b, for float0 cotangents (integer leaves) too."""
  return a if a.dtype == jax.dtypes.float0 else a + b


class LanguageModel(nnx.Module):
  """A HOPE-family causal LM; `model(tokens_BL)` returns float32 logits `[B, L, V]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = DTYPES[cfg.param_dtype]
    self.embed = nnx.Param(normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, param_dtype=pd)
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, std=0.02, rngs=rngs,
                            dtype=DTYPES[cfg.dtype], param_dtype=pd)
    self.fast_cms = has_fast_weights(cfg)

  def embed_tokens(self, tokens_BL):
    """Embeddings `[B, L, D]` of token ids `[B, L]`; an id outside [0, vocab_size) gives a
    NaN row (jnp.take would read a negative id from the end of the table)."""
    if tokens_BL.ndim != 2:
      raise ValueError(f"tokens must be [batch, length] ids, got shape {tokens_BL.shape}")
    table_VD = self.embed[...]
    v = table_VD.shape[0]
    ids_BL = jnp.where((tokens_BL >= 0) & (tokens_BL < v), tokens_BL, v)
    return jnp.take(table_VD, ids_BL, axis=0, mode="fill", fill_value=jnp.nan).astype(
        DTYPES[self.cfg.dtype])

  def logits(self, h_BLD):
    h_BLD = self.final_norm(h_BLD)
    if self.cfg.tie_embeddings:
      return jnp.einsum("bld,vd->blv", h_BLD, self.embed[...].astype(h_BLD.dtype),
                        preferred_element_type=jnp.float32)
    return self.lm_head(h_BLD).astype(jnp.float32)

  def __call__(self, tokens_BL):
    if self.fast_cms:
      return self.forward_with_fast_state(tokens_BL, final_state=False)[0]
    x_BLD = self.embed_tokens(tokens_BL)
    x_BLD, _ = self._run_blocks(lambda blk, x_BLD, _: (blk(x_BLD), None), x_BLD, None)
    return self.logits(x_BLD)

  def _scan_layers(self, scan: bool | None = None) -> bool:
    """Whether the blocks run in one `lax.scan`: `scan` (default `cfg.scan_layers`), >1 block."""
    return (self.cfg.scan_layers if scan is None else scan) and len(self.blocks) > 1

  def _run_blocks(self, fn, x_BLD, items, stacked: bool = False, scan: bool | None = None):
    """Threads `x_BLD` through every block: `x_BLD, out_i = fn(block_i, x_BLD, item_i)`.

    `items` holds one pytree per layer (None: nothing), as a list or, with `stacked`, as one
    pytree with a leading layer axis (only the scan takes those); the outs come back in the
    same form. With `scan` (default: `cfg.scan_layers`) the blocks' variables, identical in
    structure, are stacked and one `lax.scan` runs the block, so XLA traces and compiles one
    block instead of N.
    """
    n = len(self.blocks)
    if items is None:
      items = [None] * n
    if not (stacked or self._scan_layers(scan)):
      outs = []
      traced = isinstance(x_BLD, jax.core.Tracer)  # Eagerly, each `fn` would compile anew.
      for block, item in zip(self.blocks, items, strict=True):
        x_BLD, out = (_block_call(fn, *nnx.split(block), x_BLD, item) if traced
                      else fn(block, x_BLD, item))
        outs.append(out)
      return x_BLD, outs
    graphdef, first = nnx.split(self.blocks[0])
    rest = [nnx.split(b) for b in self.blocks[1:]]
    if any(g != graphdef for g, _ in rest):
      raise ValueError("model.scan_layers needs blocks of one structure; these differ: set "
                       "model.scan_layers=False")
    block_vars = _stack([first] + [v for _, v in rest])

    def body(x_BLD, xs):
      return fn(nnx.merge(graphdef, xs[0]), x_BLD, xs[1])

    x_BLD, outs = jax.lax.scan(body, x_BLD, (block_vars, items if stacked else _stack(items)))
    return x_BLD, (outs if stacked or outs is None else _unstack(outs, n))

  # ------------------------------------------------------------ chunk pieces

  def chunk_forward(self, tokens_BC, states, deltas, aligned: bool = False,
                    stacked: bool = False, scan: bool | None = None):
    """All layers on a piece of tokens from carried mixer states and CMS deltas.

    Returns (logits_BCV, new_states). `states` and `deltas` are per-layer lists (a delta of
    None: static CMS) or, with `stacked`, pytrees with a leading layer axis (`deltas` None:
    static CMS); the new states come back in the same form. `scan` overrides
    `cfg.scan_layers` (`decode_step` runs the blocks in a Python loop, so a token does not
    copy every layer's cache into a stack; a whole prompt in `prefill` may).
    """
    x_BCD = self.embed_tokens(tokens_BC)
    items = (states, deltas) if stacked else list(zip(states, deltas, strict=True))
    x_BCD, new_states = self._run_blocks(
        lambda blk, x_BCD, item: blk.step(x_BCD, *item, aligned=aligned), x_BCD, items,
        stacked=stacked, scan=scan)
    return self.logits(x_BCD), new_states

  def chunk_grads(self, tokens_BC, targets_BC, mask_BC, states, deltas, stacked: bool = False,
                  scan: bool | None = None):
    """Per layer and level, d(chunk CE sum)/d(level weights) at the current fast weights.

    The CE is summed over the chunk's unmasked tokens and over the batch; each sequence's
    delta only touches its own loss, so one vjp gives every per-sequence gradient. These
    are the gradients of `chunk_forward_and_grads` (without the mixers' learning where the
    piece `splits`; elsewhere XLA drops the unused logits and states); an outer
    differentiation never traces through this inner backward pass.
    """
    return self.chunk_forward_and_grads(tokens_BC, targets_BC, mask_BC, states, deltas,
                                        stacked, scan,
                                        make_states=not self.splits(tokens_BC.shape[1]))[2]

  def splits(self, length: int) -> bool:
    """Whether every mixer's outputs on an aligned piece of `length` read only its carried
    state (`SelfModTitans.splits`), so the piece's loss never depends on what it learns."""
    return all(b.mixer.splits(length) for b in self.blocks)

  def _reference_grads(self, tokens_BC, targets_BC, mask_BC, states, deltas, stacked: bool):
    """`chunk_grads` by `jax.grad` of the whole chunk's loss on a stop-gradient copy of the
    model and states: the two-pass reference (`lm_grad_fused=False`)."""
    graphdef, params = nnx.split(self)
    params, states = jax.lax.stop_gradient((params, states))

    def loss(d):
      logits_BCV, _ = nnx.merge(graphdef, params).chunk_forward(tokens_BC, states, d,
                                                                aligned=True, stacked=stacked)
      return cms_ops.masked_token_ce(logits_BCV, targets_BC, mask_BC)

    return jax.grad(loss)(jax.lax.stop_gradient(deltas))

  def chunk_forward_and_grads(self, tokens_BC, targets_BC, mask_BC, states, deltas,
                              stacked: bool = False, scan: bool | None = None,
                              make_states: bool = True):
    """`chunk_forward` and the write gradients of one aligned piece from one forward pass.

    Returns (logits_BCV, new_states, grads). The inner gradient is one backward pass
    through the forward's own residuals, and the outer derivative reuses those residuals
    too, so each chunk is run forward once (the reference, `lm_grad_fused=False`, runs
    `chunk_grads` and then `chunk_forward` again). A `custom_vjp` keeps the outer
    differentiation from tracing the inner backward pass: the writes are first order (their
    cotangent is dropped) and the deltas enter the outer loss straight-through, exactly as
    in the unfused pair. With `make_states=False` (only where `splits` holds) the mixers learn
    nothing and the states come back as None: the last chunk of a sequence, whose states
    nobody reads.
    """
    graphdef, params = nnx.split(self)
    split = self.splits(tokens_BC.shape[1])
    if not (make_states or split):
      raise ValueError("make_states=False needs a piece whose outputs read only the carried "
                       "states (LanguageModel.splits)")

    def forward(p, s, d, tok):
      return nnx.merge(graphdef, p).chunk_forward(tok, s, d, aligned=True, stacked=stacked,
                                                  scan=scan)

    def read(p, s, d, tok):  # Logits and each mixer's input (`Block.read_step`).
      model = nnx.merge(graphdef, p)
      items = (s, d) if stacked else list(zip(s, d, strict=True))
      x_BCD, u_BCD = model._run_blocks(lambda blk, x_BCD, item: blk.read_step(x_BCD, *item),
                                       model.embed_tokens(tok), items, stacked=stacked,
                                       scan=scan)
      return model.logits(x_BCD), u_BCD

    def update(p, s, u):  # The new states from the mixers' inputs (`Block.update_step`).
      model = nnx.merge(graphdef, p)
      items = (s, u) if stacked else list(zip(s, u, strict=True))
      return model._run_blocks(lambda blk, x, item: (x, blk.update_step(item[1], item[0])),
                               jnp.zeros(()), items, stacked=stacked, scan=scan)[1]

    def with_grads(p, s, d, tok, tgt, mask):
      if split:
        # The piece's outputs read only the carried states, so the write's backward pass
        # never enters the mixers' inner loops: they run in `update`, whose outputs (the
        # new states) reach later pieces alone.
        (logits_BCV, u), vjp_fn = jax.vjp(lambda p, s, d: read(p, s, d, tok), p, s, d)
        ct_rest = jax.tree.map(jnp.zeros_like, u)
        states_out, vjp_update = jax.vjp(update, p, s, u) if make_states else (None, None)
      else:
        (logits_BCV, states_out), vjp_fn = jax.vjp(lambda p, s, d: forward(p, s, d, tok), p, s,
                                                   d)
        vjp_update, ct_rest = None, jax.tree.map(_zero_cotangent, states_out)
      dlogits = jax.grad(cms_ops.masked_token_ce)(logits_BCV, tgt, mask)
      with jax.named_scope("cms_write_grads"):
        _, _, grads = vjp_fn((dlogits, ct_rest))
      # (Only a split piece that makes no state keeps its zeros, the size of the chunk's
      # activations: the backward pass reads them there and nowhere else.)
      keep = ct_rest if split and not make_states else None
      return (logits_BCV, states_out, grads), (vjp_fn, vjp_update, keep)

    @jax.custom_vjp
    def fused(p, s, d, tok, tgt, mask):
      return with_grads(p, s, d, tok, tgt, mask)[0]

    def fused_bwd(vjp_fns, cts):
      ct_logits, ct_states, _ = cts  # The write's cotangent: dropped (first order).
      vjp_fn, vjp_update, ct_rest = vjp_fns
      if not split:
        ct_p, ct_s, _ = vjp_fn((ct_logits, ct_states))
      elif vjp_update is None:  # No state was made: zeros for the mixers' inputs.
        ct_p, ct_s, _ = vjp_fn((ct_logits, ct_rest))
      else:
        ct_p_upd, ct_s_upd, ct_u = vjp_update(ct_states)
        ct_p, ct_s, _ = vjp_fn((ct_logits, ct_u))
        ct_p, ct_s = jax.tree.map(_add_cotangents, (ct_p, ct_s), (ct_p_upd, ct_s_upd))
      return ct_p, ct_s, None, None, None, None  # Deltas enter straight-through.

    fused.defvjp(with_grads, fused_bwd)
    logits_BCV, new_states, grads = fused(params, states, deltas, tokens_BC, targets_BC, mask_BC)
    return logits_BCV, new_states, jax.tree.map(jax.lax.stop_gradient, grads)

  def _init_states(self, batch_size: int, max_len: int):
    mixers = [b.mixer.init_state(batch_size, max_len) for b in self.blocks]
    fast = [b.ffn.init_fast_state(batch_size) if b.uses_cms else None for b in self.blocks]
    return mixers, fast

  def _write(self, fast, grads, tokens_seen, stacked: bool = False, frozen: tuple = ()):
    cfg = self.cfg
    chunks = _kept(cfg.cms_chunks, frozen)  # Frozen levels: no write.
    write = lambda f, g: cms_ops.schedule_update(f, _kept(g, frozen), tokens_seen, chunks,
                                                 cfg.cms_lr, cfg.cms_grad_clip)
    if stacked:
      return jax.vmap(write)(fast, grads)
    return [write(f, g) for f, g in zip(fast, grads, strict=True)]

  # --------------------------------------------------------- lm_grad forward

  def forward_with_fast_state(self, tokens_BL, collect_deltas: bool = False,
                              final_state: bool = True):
    """The `lm_grad` forward: a `lax.scan` over chunks of C_1 tokens (spec §3.3).

    Args:
      tokens_BL: int tokens; L need not be a multiple of C_1 (the tail is padded and its
        positions carry no loss).
      collect_deltas: also return every chunk's post-write deltas (for tests).
      final_state: return the fast state after the last chunk. Without it (the logits
        alone, `__call__`) a level whose first write would come after the last token
        (C_l >= the padded length, `cms_ops.frozen_levels`) is frozen: it keeps its initial
        deltas, out of the scan's carry, and its gradients and accumulators are never
        formed. The logits and their derivatives are the same (tested); at L=2048 the
        default C_4 = 4096 is such a level, at L=512 also C_3 = 1024.

    Returns:
      (logits_BLV, final fast state per layer or None, per-chunk deltas or None).
    """
    b, l = tokens_BL.shape
    c1 = self.cfg.cms_chunks[0]
    n = -(-l // c1)
    pad = n * c1 - l
    toks_BL = jnp.pad(tokens_BL, ((0, 0), (0, pad)))
    tgts_BL = jnp.pad(tokens_BL[:, 1:], ((0, 0), (0, pad + 1)))
    mask_BL = jnp.broadcast_to(jnp.arange(n * c1)[None] < l - 1, (b, n * c1)).astype(jnp.float32)
    to_chunks = lambda a: a.reshape(b, n, c1).swapaxes(0, 1)
    states, fast = self._init_states(b, n * c1)
    # With the layer scan the carry holds every layer's state stacked, so a chunk does not
    # copy the states (and the per-sequence CMS deltas) into a stack and out again.
    stacked = self._scan_layers()
    if stacked:
      states, fast = _stack(states), _stack(fast)
    frozen = () if final_state or collect_deltas else cms_ops.frozen_levels(
        self.cfg.cms_chunks, n * c1, self.cfg.cms_variant)
    if stacked:
      held = [fast["delta"][i] for i in frozen]
      fast = _drop_levels(fast, frozen)
      get_deltas = lambda f: _with_levels(f["delta"], held, frozen)
    else:
      held = [[f["delta"][i] for i in frozen] for f in fast]
      fast = [_drop_levels(f, frozen) for f in fast]
      get_deltas = lambda f: [_with_levels(x["delta"], h, frozen) for x, h in zip(f, held,
                                                                                 strict=True)]

    def body(carry, xs):
      states, fast = carry
      tok_BC, tgt_BC, mask_BC, index = xs
      deltas = get_deltas(fast)
      if self.cfg.lm_grad_fused:
        logits_BCV, states, grads = self.chunk_forward_and_grads(tok_BC, tgt_BC, mask_BC,
                                                                 states, deltas, stacked)
      else:
        # The outer (differentiable) forward, straight-through in the deltas; then the
        # inner gradient from a separate pass over the same chunk.
        grads = self._reference_grads(tok_BC, tgt_BC, mask_BC, states, deltas, stacked)
        logits_BCV, states = self.chunk_forward(tok_BC, states,
                                                jax.tree.map(jax.lax.stop_gradient, deltas),
                                                aligned=True, stacked=stacked)
      fast = self._write(fast, grads, (index + 1) * c1, stacked, frozen)
      out = (logits_BCV, get_deltas(fast) if collect_deltas else None)
      return (states, fast), out

    if self.cfg.remat and not self.cfg.lm_grad_fused:
      # (The fused body keeps its residuals: recomputing it would redo the inner pass.)
      body = jax.checkpoint(body)
    xs = (to_chunks(toks_BL), to_chunks(tgts_BL), to_chunks(mask_BL), jnp.arange(n))
    every = self.cfg.lm_grad_remat_every
    if not (self.cfg.lm_grad_fused and self.splits(c1)):
      (_, fast), (logits_NBCV, deltas) = _grouped_scan(body, (states, fast), xs, every)
    else:
      # Nobody reads the mixer states after the last chunk, and its outputs read only the
      # states before it: it runs after the scan without learning, which saves the inner
      # loops' forward and backward passes of one chunk in n.
      head = jax.tree.map(lambda a: a[:-1], xs)
      (states, fast), (logits_NBCV, deltas) = _grouped_scan(body, (states, fast), head, every)
      tok_BC, tgt_BC, mask_BC, _ = jax.tree.map(lambda a: a[-1], xs)
      logits_BCV, _, grads = self.chunk_forward_and_grads(
          tok_BC, tgt_BC, mask_BC, states, get_deltas(fast), stacked, make_states=False)
      fast = self._write(fast, grads, n * c1, stacked, frozen)
      logits_NBCV = jnp.concatenate([logits_NBCV, logits_BCV[None]])
      if collect_deltas:
        deltas = jax.tree.map(lambda a, d: jnp.concatenate([a, d[None]]), deltas,
                              get_deltas(fast))
    logits_BLV = logits_NBCV.swapaxes(0, 1).reshape(b, n * c1, -1)[:, :l]
    if not final_state:
      fast = None  # (A frozen level's accumulators were never formed.)
    if stacked:  # Back to the per-layer lists of the unstacked path.
      fast = None if fast is None else _unstack(fast, len(self.blocks))
      if deltas is not None:  # [chunk, layer, ...] -> per layer [chunk, ...]
        deltas = _unstack(deltas, len(self.blocks), axis=1)
    return logits_BLV, fast, deltas

  # ------------------------------------------------------- streaming decode

  def init_cache(self, batch_size: int, max_len: int = 2048):
    """Every recurrent state of spec §5 for `batch_size` sequences, as a pytree of arrays.

    `max_len` bounds the KV cache of attention blocks: past it their outputs, and so the
    logits, are NaN; the `hope` and `titans_lmm` states do not depend on it.
    """
    mixers, fast = self._init_states(batch_size, max_len)
    cache = {"pos": jnp.zeros((), jnp.int32), "mixer": mixers}
    if self.fast_cms:
      cache["fast"] = fast
      cache["snap"] = [_snapshot(b.mixer, s) for b, s in zip(self.blocks, mixers, strict=True)]
      cache["buf"] = jnp.zeros((batch_size, self.cfg.cms_chunks[0]), jnp.int32)
    return cache

  def decode_step(self, tokens_B, cache):
    """Feeds one token per sequence; returns (logits_BV, cache). Jit-friendly."""
    pos = cache["pos"]
    deltas = [None] * len(self.blocks)
    if self.fast_cms:
      c1 = self.cfg.cms_chunks[0]

      def boundary(c):
        # Token `pos` is the last target of the finished chunk [pos - C_1, pos).
        starts = [_restore(b.mixer, m, s)
                  for b, m, s in zip(self.blocks, c["mixer"], c["snap"], strict=True)]
        tgt_BC = jnp.concatenate([c["buf"][:, 1:], tokens_B[:, None]], axis=1)
        grads = self.chunk_grads(c["buf"], tgt_BC, jnp.ones(tgt_BC.shape, jnp.float32),
                                 starts, [f["delta"] for f in c["fast"]], scan=False)
        snap = [_snapshot(b.mixer, m) for b, m in zip(self.blocks, c["mixer"], strict=True)]
        return self._write(c["fast"], grads, pos), snap

      at_boundary = (pos > 0) & (jnp.mod(pos, c1) == 0)
      # Only what the write changes leaves the cond: KV caches passed through it were copied
      # on every token (XLA gives a conditional's outputs their own buffers).
      # The token also leaves the cond (through a barrier XLA cannot forward out of it), so
      # that everything after it, the first layer's KV-cache update included, waits for the
      # cond: otherwise that update could run beside the cond, which reads the cache, and XLA
      # copied the first layer's cache twice per token to allow it.
      fast, snap, tokens_B = jax.lax.cond(
          at_boundary, lambda c: (*boundary(c), jax.lax.optimization_barrier(tokens_B)),
          lambda c: (c["fast"], c["snap"], jax.lax.optimization_barrier(tokens_B)), cache)
      cache = {**cache, "fast": fast, "snap": snap}
      buf = jax.lax.dynamic_update_slice(cache["buf"], tokens_B[:, None].astype(jnp.int32),
                                         (0, jnp.mod(pos, c1)))
      cache = {**cache, "buf": buf}
      deltas = [f["delta"] for f in cache["fast"]]
    logits_B1V, mixers = self.chunk_forward(tokens_B[:, None], cache["mixer"], deltas,
                                            scan=False)
    return logits_B1V[:, 0], {**cache, "mixer": mixers, "pos": pos + 1}

  def prefill(self, tokens_BL, cache):
    """Feeds a prompt; returns (logits of its last token `[B, V]`, cache).

    Without in-context CMS writes the whole prompt goes through every mixer's `step` in one
    parallel piece; with them it runs `decode_step` in a `lax.scan`, so every boundary write
    happens exactly where streaming would apply it.
    """
    if not self.fast_cms:
      logits_BLV, mixers = self.chunk_forward(tokens_BL, cache["mixer"],
                                              [None] * len(self.blocks))
      return logits_BLV[:, -1], {**cache, "mixer": mixers, "pos": cache["pos"] + tokens_BL.shape[1]}

    def body(c, tok_B):
      logits_BV, c = self.decode_step(tok_B, c)
      return c, logits_BV

    cache, logits_LBV = jax.lax.scan(body, cache, tokens_BL.swapaxes(0, 1))
    return logits_LBV[-1], cache
