"""How fast XLA multiplies the inner loops' small matrices: a ceiling for a HOPE step's MFU.

Run:
  python benchmarks/inner_products.py                  # the issue's size: D=256, H=4, B=8
  python benchmarks/inner_products.py --json=inner_products.json

The Titans sublayer's inner loops (phases A and B, `hope_jax/ops/selfmod.py`) do their
work as batched products of small matrices, one per (sample, head[, memory]) and chunk:
phase A multiplies C_o x Dh by Dh x E_p blocks (16 x 64 by 64 x 64 at this size) for
B*H*M = 128 matrices at once, phase B C_m x Dh by Dh x E_m (64 x 64 by 64 x 256) for
B*H = 32. This script times every (m, k, n) product shape the two phases use, in all four
operand layouts (row-major or transposed left and right operands), as one jitted batched
einsum, and states each as a fraction of the dense matmul peak measured in the same
process (`benchmarks/peak.py`).

From those rates and hope-spec §8's FLOP count (`hope_jax.flops.titans_fwd_parts`: each
phase's share of the step's FLOPs) it prints an upper bound on a `hope` train step's MFU:
the step could reach it only if every FLOP of a phase ran at the rate of that phase's
fastest product in its best layout, everything outside the inner loops ran at the peak,
and nothing else (elementwise work, copies, the scans' bookkeeping) took any time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.peak import flops_rate, matmul_peak  # noqa: E402
from hope_jax.config import ModelConfig  # noqa: E402
from hope_jax.flops import step_flops, titans_fwd_parts  # noqa: E402
from hope_jax.model.titans import inner_spec  # noqa: E402

# Operand layouts: the left operand [m, k] or transposed [k, m], the right [k, n] or [n, k].
LAYOUTS = ("mk,kn", "km,kn", "mk,nk", "km,nk")


def product_shapes(cfg: ModelConfig, batch: int) -> list[dict]:
  """The (batch, m, k, n) products of one chunk of phases A and B, with what each computes."""
  spec = inner_spec(cfg)
  dh, e_p, e_m = cfg.head_dim, cfg.e_proj, cfg.e_mem
  rows = []
  for phase, c, e, mats in (("A", cfg.chunk_other, e_p, batch * cfg.num_heads * len(spec.live)),
                            ("B", cfg.chunk_mem, e_m, batch * cfg.num_heads)):
    if phase == "A" and not spec.live:
      continue
    seen = {}
    for what, mkn in (("reads W2 x: C x Dh by Dh x E", (c, dh, e)),
                      ("reads W1 h: C x E by E x Dh", (c, e, dh)),
                      ("W2 update U K: E x C by C x Dh", (e, c, dh)),
                      ("W1 update U H: Dh x C by C x E", (dh, c, e)),
                      ("DGD W2 K^T: E x Dh by Dh x C", (e, dh, c))):
      seen.setdefault(mkn, []).append(what)
    rows += [{"phase": phase, "matrices": mats, "m": m, "k": k, "n": n, "uses": uses}
             for (m, k, n), uses in seen.items()]
  return rows


def _operand(key, shape, batch, m, k, n):
  dims = {"m": m, "k": k, "n": n}
  return jax.random.normal(key, (batch, *[dims[a] for a in shape]), jnp.float32)


def time_product(batch: int, m: int, k: int, n: int, layout: str, min_seconds: float) -> float:
  """FLOP/s of one jitted batched product in `layout` (calls dispatched 50 at a time)."""
  left, right = layout.split(",")
  a = _operand(jax.random.key(0), left, batch, m, k, n)
  b = _operand(jax.random.key(1), right, batch, m, k, n)
  product = jax.jit(lambda a, b: jnp.einsum(f"b{left},b{right}->bmn", a, b))
  return flops_rate(lambda: product(a, b), 2.0 * batch * m * k * n, min_seconds, group=50)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=512)
  ap.add_argument("--min_seconds", type=float, default=0.5, help="timing per product layout")
  ap.add_argument("--peak_sizes", default="1024,2048", help="square sizes for the peak")
  ap.add_argument("--peak_seconds", type=float, default=1.0)
  ap.add_argument("--json", default=None, help="also write the results here")
  args = ap.parse_args()

  cfg = ModelConfig(block="hope", hidden_size=args.hidden, num_heads=args.heads,
                    num_layers=args.layers)
  peak = matmul_peak("float32", tuple(int(n) for n in args.peak_sizes.split(",")),
                     args.peak_seconds)["flops_per_s"]
  rows = product_shapes(cfg, args.batch)
  for r in rows:
    r["flops_per_s"] = {lay: time_product(r["matrices"], r["m"], r["k"], r["n"], lay,
                                          args.min_seconds) for lay in LAYOUTS}
    r["best"] = max(r["flops_per_s"], key=r["flops_per_s"].get)
    print(r["phase"], r["m"], r["k"], r["n"], {k: round(v / 1e9, 1) for k, v in
                                               r["flops_per_s"].items()}, flush=True)

  fl, parts = step_flops(cfg, args.length), titans_fwd_parts(cfg)
  share = {"A": cfg.num_layers * parts.phase_a / fl.fwd_model,
           "B": cfg.num_layers * parts.phase_b / fl.fwd_model}
  best_eff = {ph: max((r["flops_per_s"][r["best"]] for r in rows if r["phase"] == ph),
                      default=1.0) / peak for ph in share}
  rest = 1.0 - sum(share.values())
  bound = 1.0 / (sum(share[ph] / best_eff[ph] for ph in share) + rest)

  print(f"\n### Inner-loop products, `hope` D={args.hidden}, H={args.heads}, B={args.batch} "
        f"({jax.devices()[0].device_kind}, {os.cpu_count()} cores; float32 peak "
        f"{peak / 1e9:.0f} GFLOP/s)\n")
  print("| phase | batch of matrices | m x k x n | used for | " +
        " | ".join(f"`{lay}` GFLOP/s" for lay in LAYOUTS) + " | best, % of peak |")
  print("|---|---|---|---|" + "---|" * len(LAYOUTS) + "---|")
  for r in rows:
    cells = " | ".join(f"{r['flops_per_s'][lay] / 1e9:.0f}" for lay in LAYOUTS)
    best = r["flops_per_s"][r["best"]]
    print(f"| {r['phase']} | {r['matrices']} | {r['m']} x {r['k']} x {r['n']} | "
          f"{'; '.join(r['uses'])} | {cells} | {100 * best / peak:.0f}% (`{r['best']}`) |")
  print("\n| part of the step's model FLOPs (spec §8) | share | best rate, % of peak |")
  print("|---|---|---|")
  for ph in share:
    print(f"| phase {ph} inner loop | {100 * share[ph]:.1f}% | {100 * best_eff[ph]:.0f}% |")
  print(f"| everything else (static projections, CMS, LM head) | {100 * rest:.1f}% | 100% "
        f"(assumed) |")
  print(f"\nUpper bound on a `hope` train step's MFU (each phase's FLOPs at its best product's "
        f"rate, the rest at the peak, nothing else costing time): **{100 * bound:.0f}%**")
  if not args.json:
    return
  with open(args.json, "w") as f:
    json.dump({"config": vars(args), "device": jax.devices()[0].device_kind,
               "peak_flops_per_s": peak, "products": rows, "flop_share": share,
               "best_efficiency": best_eff, "mfu_bound": bound}, f, indent=2)
  print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
