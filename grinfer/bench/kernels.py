"""Benchmark: check and time the Triton HSTU attention kernel on a GPU at the R1 shapes.

    python3 -m grinfer.bench.kernels [--batch 32] [--sweep] [--json PATH]
    TRITON_INTERPRET=1 python3 -m grinfer.bench.kernels --smoke [--sweep]   # tiny shapes on the CPU: the script runs

--sweep also times the launch shapes (SWEEP) and the kernel's variants (VARIANTS, KERNELS.md's versions 5+) in
the fused backend's call (paged keys + layout counts), each checked against the reference on a poisoned output;
a variant that fails to compile is a row saying why.

Needs only torch and triton (no grinfer module that imports pydantic or typer). Shapes: mtgr-large
attention, 3 heads of head dim 256, B users of 16 U + 1000 S + 100 R context events and 512
candidates:

  cold  every token is a query; keys = the same tokens (the uncached forward)
  warm  queries = 10 new R events + the 512 candidates of each user; keys = the cached context
        (16 U + 1000 S + 110 R, the new events included) + the candidates (a warm engine step)

Counted work, per case:
  useful FLOPs = 2 * (Dqk + Dv) * H * (visible query-key pairs): the QK^T and PV products of
  the pairs the mask keeps (a pair is a query and a key it may see, counted from the reference's
  mask; a candidate's self pair included); the SiLU, mask and normaliser are not counted.
  bytes = q, k, v read once and the output written once, in bf16.
  floor = max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth).
Every implementation's TFLOP/s is the useful FLOPs over its time, also for the dense baseline,
which computes every padded pair.

Errors are against the reference in fp32 (TF32 off) on the same fp32 inputs: max |out - ref| and
||out - ref|| / ||ref||. Times: triton.testing.do_bench, median, milliseconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from grinfer.ops.groups import GROUP_C, GROUP_R, GROUP_S, GROUP_U
from grinfer.ops.jagged import jagged_to_padded, offsets_of, padded_to_jagged
from grinfer.ops.reference.hstu_attention import attend, hstu_attention, plan_attention
from grinfer.ops.triton.hstu_attention import (
    KernelConfig,
    default_config,
    key_counts,
    launch_hstu_attention,
    triton_hstu_attention,
)


@dataclass(frozen=True)
class Shapes:
    heads: int = 3
    head_dim: int = 256
    u: int = 16
    s: int = 1000
    r: int = 100
    c: int = 512
    new_r: int = 10
    max_seq_len: int = 1664  # mtgr-large's (the 'max_len' normaliser)


R1 = Shapes()
SMOKE = Shapes(heads=2, head_dim=32, u=2, s=21, r=6, c=9, new_r=2, max_seq_len=48)
# launch shapes timed by --sweep (m128 n64 w8 s3 and m128 n128 w8 s2 need more shared memory than an H100/H200 has)
SWEEP = [KernelConfig(128, 32, 8, 2), KernelConfig(128, 32, 8, 3), KernelConfig(128, 16, 8, 2),
         KernelConfig(64, 32, 4, 2), KernelConfig(64, 32, 4, 3), KernelConfig(64, 64, 8, 2),
         KernelConfig(128, 64, 8, 2)]
# the kernel's opt-in variants, also timed by --sweep in the fused backend's call (KERNELS.md, versions 5+, lists
# each one's shared memory and spills from an offline sm_90 compile with Triton 3.6)
M64, M128 = KernelConfig(64, 32, 4, 3), KernelConfig(128, 32, 8, 3)
VARIANTS = [
    replace(M64, num_stages=2, prefetch=True), replace(M64, prefetch=True),  # 132 KB at s3: 1 program per SM
    replace(M64, num_stages=4, prefetch=True), KernelConfig(64, 16, 4, 4), KernelConfig(64, 16, 4, 4, prefetch=True),
    replace(M128, num_stages=2, prefetch=True), replace(M128, prefetch=True),  # 165 KB, 24-byte stack
    replace(M64, scan=256), replace(M64, prefetch=True, scan=256), replace(M128, prefetch=True, scan=256),
    replace(M64, prefetch=True, loop_stages=4), replace(M64, warp_specialize=True), replace(M64, unroll=2),
    replace(M64, persistent=2), replace(M64, prefetch=True, persistent=1), replace(M128, prefetch=True, persistent=1),
    replace(M64, overlap=True), replace(M128, overlap=True),
    replace(M64, tma=True), replace(M64, num_stages=2, tma=True, prefetch=True), replace(M128, tma=True, prefetch=True),
    replace(M128, tma=True, prefetch=True, scan=256),
]


def bench(fn) -> float:
    if DEVICE == "cpu":  # --smoke: one call, timed on the host
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cast(float, do_bench(fn, warmup=25, rep=100, return_mode="median"))  # one float for "median"


DEVICE = "cuda"


def ceilings() -> dict[str, float]:
    """Measured bf16 matmul rate (8192^3) and device copy bandwidth (1 GiB, read + write)."""
    if DEVICE == "cpu":
        return {"matmul_tflops": 1.0, "copy_tbps": 0.01}
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    x = torch.randn(2**28, device="cuda")
    y = torch.empty_like(x)
    ms_copy = bench(lambda: y.copy_(x))
    return {"matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_tbps": 2 * x.numel() * 4 / ms_copy / 1e9}


def build(sh: Shapes, case: str, batch: int, gen: torch.Generator) -> dict:
    """fp32 q, k, v and per-token metadata of one case (all users alike but for their random values)."""
    dev = DEVICE
    n_r = sh.r + (sh.new_r if case == "warm" else 0)
    groups = [GROUP_U] * sh.u + [GROUP_S] * sh.s + [GROUP_R] * n_r + [GROUP_C] * sh.c
    k_group = torch.tensor(groups * batch, device=dev)
    k_pos = torch.arange(len(groups), device=dev).repeat(batch)
    q_from = 0 if case == "cold" else sh.u + sh.s + sh.r  # warm: the new R events and the candidates
    q_len = len(groups) - q_from
    q_rows = (torch.arange(batch, device=dev)[:, None] * len(groups) + q_from
              + torch.arange(q_len, device=dev)).flatten()
    t_k = len(groups) * batch
    q = torch.randn(len(q_rows), sh.heads, sh.head_dim, generator=gen, device=dev)
    k = torch.randn(t_k, sh.heads, sh.head_dim, generator=gen, device=dev)
    v = torch.randn(t_k, sh.heads, sh.head_dim, generator=gen, device=dev)
    return {"q": q, "k": k, "v": v, "q_group": k_group[q_rows], "q_pos": k_pos[q_rows], "k_group": k_group,
            "k_pos": k_pos, "q_offsets": offsets_of(torch.full((batch,), q_len, device=dev)),
            "k_offsets": offsets_of(torch.full((batch,), len(groups), device=dev)), "max_len_q": q_len}


def paged(x: dict, k: torch.Tensor, v: torch.Tensor, batch: int, gen: torch.Generator, page: int = 32):
    """(k_pool, v_pool, block_table): each user's keys moved into shuffled pages of `page` slots, as the
    engine's KV cache holds them (the candidates' in scratch pages)."""
    per_user = len(x["k_group"]) // batch
    blocks = -(-per_user // page)
    table = torch.randperm(batch * blocks, generator=gen, device=k.device).view(batch, blocks)
    j = torch.arange(per_user, device=k.device)
    slots = (table[:, j // page] * page + j % page).flatten()
    k_pool, v_pool = (t.new_zeros(batch * blocks * page, *t.shape[1:]) for t in (k, v))
    k_pool[slots], v_pool[slots] = k, v
    return k_pool, v_pool, table


def analytic_pairs(sh: Shapes, case: str, batch: int) -> int:
    """Visible pairs under the dynamic mask, by counting (to cross-check the mask's sum)."""
    ctx_us = sh.u + sh.s
    if case == "cold":
        n_r = sh.r
        per = ctx_us * ctx_us + sum(ctx_us + i + 1 for i in range(n_r)) + sh.c * (ctx_us + n_r + 1)
    else:
        n_r = sh.r + sh.new_r
        per = sum(ctx_us + i + 1 for i in range(sh.r, n_r)) + sh.c * (ctx_us + n_r + 1)
    return per * batch


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = out.float() - ref
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / ref.norm()),
            "finite": bool(torch.isfinite(out).all())}


def dense_baseline(x: dict, plan, alpha: float):
    """A bf16 masked SDPA-style baseline on padded tensors: (SiLU(alpha Q K^T) * M / N) V per (user, head).
    Padding is done once outside the timed function (in its favour)."""
    pad = lambda t, off, n, idx: jagged_to_padded(t.bfloat16(), off, n, index=idx)[0].transpose(1, 2).contiguous()
    qp = pad(x["q"], x["q_offsets"], plan.lq, plan.q_index)  # [B, H, Lq, D]
    kp = pad(x["k"], x["k_offsets"], plan.lk, plan.k_index)
    vp = pad(x["v"], x["k_offsets"], plan.lk, plan.k_index)
    scale = plan.scale[:, None].bfloat16()  # [B, 1, Lq, Lk]

    def run():
        return torch.matmul(F.silu(torch.matmul(qp, kp.transpose(-1, -2)) * alpha) * scale, vp)

    def to_jagged(out):
        return padded_to_jagged(out.transpose(1, 2), plan.q_offsets, plan.q_index)

    return run, to_jagged


def run_case(sh: Shapes, case: str, batch: int, sweep: bool, caps: dict,
             gen: torch.Generator) -> list[dict]:
    x = build(sh, case, batch, gen)
    meta = (x["q_offsets"], x["k_offsets"], x["q_group"], x["q_pos"], x["k_group"], x["k_pos"])
    alpha = 1.0 / math.sqrt(sh.head_dim)
    plan = plan_attention(*meta, mode="dynamic", normalizer="visible")
    pairs = int((plan.scale > 0).sum())
    expected = analytic_pairs(sh, case, batch)
    if pairs != expected:
        print(f"!! {case}: mask keeps {pairs} pairs, counting gives {expected}", flush=True)
    flops = 2 * (sh.head_dim + sh.head_dim) * sh.heads * pairs
    nbytes = 2 * sh.heads * sh.head_dim * (2 * x["q"].shape[0] + 2 * x["k"].shape[0])
    floor_ms = max(flops / (caps["matmul_tflops"] * 1e9), nbytes / (caps["copy_tbps"] * 1e9))
    print(f"== {case}: B={batch}, Tq={x['q'].shape[0]}, Tk={x['k'].shape[0]}, pairs={pairs} "
          f"(counted {expected}), {flops / 1e9:.1f} GFLOP, {nbytes / 1e6:.0f} MB, floor {floor_ms:.3f} ms", flush=True)
    ref32 = attend(x["q"], x["k"], x["v"], plan)
    qb, kb, vb = (x[n].bfloat16() for n in ("q", "k", "v"))
    counts = key_counts(x["k_group"], x["k_offsets"])
    rows = []

    def record(impl: str, ms: float | None, err: dict | None, **extra):
        row = {"case": case, "batch": batch, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9 if ms else None,
               "x_floor": ms / floor_ms if ms else None, "floor_ms": floor_ms, "gflop": flops / 1e9,
               "mbytes": nbytes / 1e6, **(err or {}), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def kernel(cfg: KernelConfig | None, out: torch.Tensor | None = None, q=qb, k=kb, v=vb, compiled=False,
               **kw) -> Any:
        """The kernel's output (compiled: the output and the compiled kernel) at this case's shapes."""
        got = launch_hstu_attention(q, k, v, *meta, max_len_q=x["max_len_q"], k_counts=counts, out=out,
                                    config=cfg, **kw)
        return got if compiled else got[0]

    # correctness: poisoned output, bf16 and fp32 inputs, the other normaliser and the causal mask
    default = default_config(sh.head_dim, sh.head_dim)
    poisoned = torch.full_like(qb, float("nan"))
    kernel(default, poisoned)
    err_kernel = errors(poisoned, ref32)
    err_fp32 = errors(kernel(None, q=x["q"], k=x["k"], v=x["v"]), ref32)
    print(f"   kernel fp32 (ieee dots) vs fp32 reference: {err_fp32}", flush=True)
    for mode, normalizer in (("dynamic", "max_len"), ("causal", "visible")):
        ref = hstu_attention(x["q"], x["k"], x["v"], *meta, mode=mode, normalizer=normalizer,
                             max_seq_len=sh.max_seq_len)
        got = kernel(default, mode=mode, normalizer=normalizer, max_seq_len=sh.max_seq_len)
        print(f"   kernel bf16 {mode}/{normalizer} vs fp32 reference: {errors(got, ref)}", flush=True)
        del ref, got

    # timings
    record(f"triton {default}", bench(lambda: kernel(default)), err_kernel,
           **resources(kernel(default, compiled=True)[1]))
    record(f"triton {default} (again)", bench(lambda: kernel(default)), None)
    k_pool, v_pool, table = paged(x, kb, vb, batch, gen)
    paged_kernel = partial(kernel, default, k=k_pool, v=v_pool, block_table=table, page_size=32)
    record(f"triton {default} paged (block tables)", bench(paged_kernel), errors(paged_kernel(), ref32))
    engine = partial(kernel, k=k_pool, v=v_pool, block_table=table, page_size=32, layout_counts=True)
    fused = default_config(sh.head_dim, sh.head_dim, layout_counts=True)
    record(f"triton {fused} paged + layout counts (the fused backend's call)", bench(partial(engine, fused)),
           errors(engine(fused), ref32))
    if sweep:
        configs = [cfg for cfg in SWEEP + VARIANTS if cfg != fused]
        for i, cfg in enumerate(configs):
            print(f"-- {case} [{i + 1}/{len(configs)}] {cfg}", file=sys.stderr, flush=True)
            timed_variant(record, partial(engine, cfg), ref32, f"triton {cfg} paged + layout counts")
    k_pool, v_pool, table = paged(x, kb, vb, batch, gen, page=16)
    paged_kernel = partial(kernel, default, k=k_pool, v=v_pool, block_table=table, page_size=16)
    record(f"triton {default} paged, 16-slot pages (a block id per key)", bench(paged_kernel),
           errors(paged_kernel(), ref32))
    paged_kernel = engine = k_pool = v_pool = table = None  # free the pool before the baselines
    record("triton per call (counts + offsets check)",
           bench(lambda: triton_hstu_attention(qb, kb, vb, *meta)), None)
    timed_variant(record, partial(kernel, default, fast_silu=False), ref32, f"triton {default} exact-silu")
    ref_bf16 = hstu_attention(qb, kb, vb, *meta)
    record("reference bf16 (plan + attend)", bench(lambda: hstu_attention(qb, kb, vb, *meta)), errors(ref_bf16, ref32))
    record("reference bf16 (attend, plan shared)", bench(lambda: attend(qb, kb, vb, plan)), None)
    del ref_bf16
    run, to_jagged = dense_baseline(x, plan, alpha)
    record("dense bf16 masked (padded, SDPA-style)", bench(run), errors(to_jagged(run()), ref32))
    return rows


def timed_variant(record, call, ref32: torch.Tensor, name: str) -> None:
    """One row: call(out=...) checked on a NaN-poisoned output (every element written), then timed; a variant
    that fails to compile or launch (shared memory, registers, the compiler) is a row saying so."""
    start = time.perf_counter()
    try:
        out, compiled = call(out=torch.full_like(ref32, float("nan"), dtype=torch.bfloat16), compiled=True)
        first_s = time.perf_counter() - start
        record(name, bench(call), errors(out, ref32), first_call_s=round(first_s, 2), **resources(compiled))
    except Exception as exc:  # any failure is a row of the table, and the sweep goes on
        record(name, None, None, error=f"{type(exc).__name__}: {str(exc)[:200]}")


def resources(compiled) -> dict:
    """Registers per thread, spilled bytes and shared memory of a compiled kernel (none in the interpreter)."""
    if DEVICE == "cpu" or compiled is None:
        return {}
    return {"regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
            "smem": getattr(getattr(compiled, "metadata", None), "shared", None)}


def table(rows: list[dict], caps: dict, device: str) -> str:
    lines = [f"card: {device}; torch {torch.__version__}, triton {triton.__version__}; "
             f"bf16 matmul 8192^3: {caps['matmul_tflops']:.0f} TFLOP/s; copy: {caps['copy_tbps']:.2f} TB/s",
             "", "| case | implementation | ms (median) | useful TFLOP/s | x floor | max abs err | rel err "
             "| regs/spill/smem |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else r.get("error", "-").split(",")[0]
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        xf = f"{r['x_floor']:.1f}" if r["x_floor"] else "-"
        ea = f"{r['max_abs']:.2e}" if "max_abs" in r else "-"
        er = f"{r['rel']:.2e}" if "rel" in r else "-"
        res = f"{r['regs']}/{r['spills']}/{r['smem'] // 1024 if r['smem'] else '-'}K" if r.get("regs") else "-"
        lines.append(f"| {r['case']} B={r['batch']} | {r['impl']} | {ms} | {tf} | {xf} | {ea} | {er} | {res} |")
    floors = {r["case"]: (r["gflop"], r["mbytes"], r["floor_ms"]) for r in rows}
    lines += [""] + [f"{c}: {g:.1f} GFLOP useful, {mb:.0f} MB, floor {f:.3f} ms" for c, (g, mb, f) in floors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="users (default 32; --smoke: 2)")
    parser.add_argument("--cases", default="cold,warm")
    parser.add_argument("--sweep", action="store_true", help="also time the launch shapes in SWEEP")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (with TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    sh = SMOKE if args.smoke else R1
    batch = args.batch or (2 if args.smoke else 32)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    caps = ceilings()
    print(f"{device}: {caps}", flush=True)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for case in args.cases.split(","):
        rows += run_case(sh, case, batch, args.sweep, caps, gen)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    text = table(rows, caps, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__, **caps,
                       "rows": rows}, f, indent=1)
    print("\n" + text)
    bad = [r for r in rows if r.get("finite") is False or (r.get("rel") or 0) > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
