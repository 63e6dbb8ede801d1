"""One-command check of every kernel on a GPU or TPU (not a test): speed against the device's peak, error ratios
against the references, and a loud failure when a Pallas kernel does not compile or is not what runs.

    python bench/device_check.py [--out bench/out/device_check.json] [--budget 450] [--sections kda,step,...]
    python bench/device_check.py --smoke        # CPU: tiny shapes, Pallas kernels interpreted (tested in CI)

On a lent machine, one call from the repository root (that image's python3 has JAX with CUDA, Flax and Optax):
    python3 bench/device_check.py --out $OUT/device_check.json      # with a command timeout of ~600 s

Sections (each within a share of --budget seconds; a section stops its size sweep before a size it cannot finish):
- kda:       chunked KDA forward and forward+backward at Kimi-Linear shapes (B=1, H=32, K=V=128, bf16, T=4k..64k):
             the Pallas kernels (kda_pallas, compiled) against the XLA chunk path (kda_chunk) and the per-token
             reference (kda_reference, up to --ref-max-t).
- step:      the decode step (kda_step_pallas, state updated in place) against kda_step_reference.
- attention: MLA attention (expanded heads: H=32, Dk=192, Dv=128, bf16, causal) at long T: the Pallas kernel of
             the platform (Triton on GPU, splash on TPU) against the XLA blocked form and the reference.
- mla_cache: a prefill piece (and a decode batch) of MLA queries over a latent cache at 48B widths (H=32, R=512,
             bf16): the absorbed form (latent_attention) against the expanded one (decompressed_latent_attention),
             error between them and which is faster, against the rule `expanded_pays_off` uses (flop counts).
- int4:      the INT4 dense (int4_matmul) and grouped (int4_ragged_dot) Pallas kernels against bf16 matmuls of the
             same shapes (48B expert widths), error against a float32 matmul of the dequantised weights.
- train:     one training step (cross-entropy, AdamW) of a two-layer 48B-width model (KDA + dense MLP, MLA + MoE;
             32 routed experts instead of 256 to bound memory and compile time), kda_impl="pallas" against
             kda_impl="chunk" (same weights): loss and gradient-norm ratios, tokens/s and MFU.
Each row reports the median wall time (compile and a warm-up call excluded), TFLOP/s and GB/s (minimum HBM
traffic) with their fractions of the device's data-sheet peak (`PEAKS`; raw numbers only for an unknown device),
and error ratios ||ref - x|| / ||ref||. Pallas calls use impl="pallas" / interpret=False and their compiled
program is checked to contain the kernel (Mosaic `tpu_custom_call`, Triton `xla.gpu.triton`): a kernel that fails
to compile, errs, or is absent is reported by name and makes the exit status 1 (the other sections still run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import k2jax  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from k2jax.training.metrics import train_flops_per_token  # noqa: E402
from pallas_kernels.attention import (  # noqa: E402
    attention,
    attention_splash,
    attention_triton,
    decompressed_latent_attention,
    expanded_pays_off,
    latent_attention,
)
from pallas_kernels.int4 import dequantize_int4, int4_matmul, int4_ragged_dot, quantize_int4  # noqa: E402
from pallas_kernels.kda import kda_chunk, kda_pallas, kda_reference, kda_step_pallas, kda_step_reference  # noqa: E402

# Data-sheet peaks per chip: dense bf16 FLOP/s and HBM bytes/s, by the start of jax's device_kind.
PEAKS = {
    "NVIDIA H100 PCIe": (756e12, 2.0e12), "NVIDIA H100": (989e12, 3.35e12), "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA B200": (2250e12, 8.0e12), "TPU v4": (275e12, 1.2e12), "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5e": (197e12, 0.82e12), "TPU v5p": (459e12, 2.76e12), "TPU v5": (459e12, 2.76e12),
    "TPU v6 lite": (918e12, 1.64e12), "TPU v6e": (918e12, 1.64e12),
}
SECTIONS = ("kda", "step", "attention", "mla_cache", "int4", "train")
SHARES = {"kda": 0.33, "step": 0.05, "attention": 0.17, "mla_cache": 0.07, "int4": 0.1, "train": 0.28}  # of --budget


class KernelFailure(RuntimeError):
    """A Pallas kernel did not compile, raised, or is missing from the compiled program."""


def error_ratio(ref, x) -> float:
    """||ref - x|| / ||ref|| in float32 on the device (trees: the largest ratio over the leaves)."""
    out = 0.0
    for r, y in zip(jax.tree.leaves(ref), jax.tree.leaves(x)):
        r, y = jnp.asarray(r, jnp.float32), jnp.asarray(y, jnp.float32)
        out = max(out, float(jnp.linalg.norm(r - y) / jnp.maximum(jnp.linalg.norm(r), 1e-30)))
    return out


class Check:
    """Run state: platform facts, the time budget, rows per section and failures."""

    def __init__(self, smoke: bool, budget: float, repeats: int, ref_max_t: int):
        dev = jax.devices()[0]
        self.smoke, self.repeats, self.ref_max_t = smoke, repeats, ref_max_t
        self.platform = dev.platform                  # "gpu", "tpu" or "cpu"
        self.kind = getattr(dev, "device_kind", "")
        self.peak_flops, self.peak_bw = next((p for name, p in PEAKS.items() if self.kind.startswith(name)),
                                             (None, None))
        self.interpret = smoke                        # the kernels, interpreted on CPU in smoke mode
        self.t0, self.budget = time.perf_counter(), budget
        self.rows: dict[str, list[dict]] = {}
        self.section_s: dict[str, float] = {}
        self.timed_s = 0.0                            # seconds spent in timed calls (the sweep's estimate)
        self.failures: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def time(self, fn, *args) -> float:
        t = time.perf_counter()
        out = median_seconds(fn, *args, repeats=self.repeats)
        self.timed_s += time.perf_counter() - t
        return out

    def require_kernel(self, name: str, fn, *args):
        """Compile `fn` and fail loudly unless its program contains the platform's Pallas kernel (or, in smoke
        mode, it at least compiles). Returns the compiled function."""
        try:
            lowered = fn.lower(*args)
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001  (anything here means the kernel cannot run)
            raise KernelFailure(f"{name}: the Pallas kernel failed to compile on {self.kind or self.platform}: "
                                f"{type(e).__name__}: {e}") from e
        if not self.smoke:
            marker = "tpu_custom_call" if self.platform == "tpu" else "xla.gpu.triton"
            if marker not in lowered.as_text():
                raise KernelFailure(f"{name}: no Pallas kernel ({marker}) in the compiled program: it fell back")
        return compiled

    def rate(self, flops, bytes_, seconds) -> dict:
        out = {"ms": 1e3 * seconds}
        if flops:
            out["tflops"] = flops / seconds / 1e12
            if self.peak_flops:
                out["flops_frac"] = flops / seconds / self.peak_flops
        if bytes_:
            out["gbs"] = bytes_ / seconds / 1e9
            if self.peak_bw:
                out["bw_frac"] = bytes_ / seconds / self.peak_bw
        return out

    def add(self, section: str, row: dict):
        self.rows.setdefault(section, []).append(row)
        print(f"  [{section}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _sweep(chk: Check, sizes, deadline, run_one):
    """run_one(size) for growing sizes while the next one is expected to finish before `deadline`. Compile time
    (everything but chk.time's timed calls) is assumed to stay, the timed part to grow with the size ratio."""
    last = None
    for i, n in enumerate(sizes):
        if last is not None:
            compile_s, timed_s = last
            if time.perf_counter() + compile_s + timed_s * n / sizes[i - 1] > deadline:
                print(f"  (stopping before size {n}: out of this section's time)", flush=True)
                return
        t, timed0 = time.perf_counter(), chk.timed_s
        run_one(n)
        timed_s = chk.timed_s - timed0
        last = (time.perf_counter() - t - timed_s, timed_s)


# ----------------------------------------------------------------------------------------------- KDA

def kda_inputs(B, T, H, K, V, dtype, seed=0):
    """Layer-like inputs: L2-normalised q, k; g = -softplus(.) log-decays with a few strong channels; beta in
    (0, 1); a random initial state; cotangents (do, dstate)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, K)))
    k = unit(jax.random.normal(ks[1], (B, T, H, K)))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)) - 2.0) * jnp.where(
        jax.random.bernoulli(ks[4], 0.05, (B, T, H, K)), 30.0, 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
    h0 = 0.1 * jax.random.normal(ks[6], (B, H, K, V))
    do = jax.random.normal(ks[7], (B, T, H, V)).astype(dtype)
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)) + (h0,), (do, jnp.ones((B, H, K, V)))


def _kda_fns(impl_fn):
    def fwd(args):
        q, k, v, g, beta, h0 = args
        return impl_fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)

    def fwd_bwd(args, cot):
        out, vjp = jax.vjp(lambda a: fwd(a), args)
        return out, vjp(cot)[0]

    return jax.jit(fwd), jax.jit(fwd_bwd)


def section_kda(chk: Check, deadline):
    if chk.smoke:
        B, H, K, V, sizes, dtype = 1, 1, 16, 16, [32], jnp.bfloat16
    else:
        B, H, K, V, sizes, dtype = 1, 32, 128, 128, [4096, 8192, 16384, 32768, 65536], jnp.bfloat16
    C = 64 if not chk.smoke else 16
    impls = {"pallas": lambda *a, **kw: kda_pallas(*a, chunk_size=C, interpret=chk.interpret, **kw),
             "chunk": lambda *a, **kw: kda_chunk(*a, chunk_size=C, **kw),
             "reference": kda_reference}
    fns = {name: _kda_fns(fn) for name, fn in impls.items()}

    def one(T):
        args, cot = kda_inputs(B, T, H, K, V, dtype)
        flops = B * H * (6 * T * K * V + 3 * T * C * K + T * C * C)
        io = 2 * B * T * H * (3 * K + V + 1)                     # q, k, g, v, beta read (bf16)
        fwd_bytes = io + 2 * B * T * H * V + 8 * B * H * K * V   # + o written, state read and written
        bwd_bytes = fwd_bytes + 2 * io + 2 * B * T * H * V       # + inputs, do read again, 5 gradients written
        f, fb = fns["pallas"]
        f = chk.require_kernel(f"kda_pallas forward (T={T})", f, args)
        fb = chk.require_kernel(f"kda_pallas forward+backward (T={T})", fb, args, cot)
        out, times = {}, {}
        for name, (fn, fnb) in fns.items():
            if name == "reference" and T > chk.ref_max_t:
                continue
            if name == "pallas":
                fn, fnb = f, fb
            out[name] = (fn(args), fnb(args, cot))
            times[name] = (chk.time(fn, args), chk.time(fnb, args, cot))
        oracle = "reference" if "reference" in out else "chunk"
        for name in times:
            row = {"T": T, "impl": name, "oracle": oracle if name != oracle else "-"}
            if name != oracle:
                (o, s), (o_r, s_r) = out[name][0], out[oracle][0]
                row.update(err_o=error_ratio(o_r, o), err_state=error_ratio(s_r, s),
                           err_grads=error_ratio(out[oracle][1][1], out[name][1][1]))
            row["fwd"] = chk.rate(flops, fwd_bytes, times[name][0])
            row["fwd_bwd"] = chk.rate(3 * flops, bwd_bytes, times[name][1])
            chk.add("kda", row)
        if "chunk" in times:
            chk.add("kda", {"T": T, "impl": "pallas vs chunk", "fwd_speedup": times["chunk"][0] / times["pallas"][0],
                            "fwd_bwd_speedup": times["chunk"][1] / times["pallas"][1]})

    _sweep(chk, sizes, deadline, one)


def section_step(chk: Check, deadline):
    B, H, K, V = (2, 2, 16, 32) if chk.smoke else (64, 32, 128, 128)
    args, _ = kda_inputs(B, 1, H, K, V, jnp.bfloat16, seed=1)
    q, k, v, g, beta = (x[:, 0] for x in args[:5])
    state = jax.random.normal(jax.random.key(2), (B, H, K, V))
    step = jax.jit(lambda *a: kda_step_pallas(*a, interpret=chk.interpret), donate_argnums=(5,))
    ref = jax.jit(kda_step_reference)
    o_r, s_r = ref(q, k, v, g, beta, state)
    fresh = lambda: jnp.array(state)  # noqa: E731  (the Pallas call donates its state)
    compiled = chk.require_kernel("kda_step_pallas", step, q, k, v, g, beta, fresh())
    o, s = compiled(q, k, v, g, beta, fresh())
    bytes_ = 2 * 4 * B * H * K * V + 2 * B * H * (3 * K + 2 * V)
    flops = 6 * B * H * K * V

    def call_pallas():   # each call needs a state buffer of its own (donated)
        st = fresh()
        jax.block_until_ready(st)
        t = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, g, beta, st))
        return time.perf_counter() - t

    t_p = float(np.median([call_pallas() for _ in range(max(chk.repeats, 3))]))
    t_r = chk.time(ref, q, k, v, g, beta, state)
    chk.add("step", {"B": B, "impl": "pallas", "err_o": error_ratio(o_r, o), "err_state": error_ratio(s_r, s),
                     **chk.rate(flops, bytes_, t_p)})
    chk.add("step", {"B": B, "impl": "reference (XLA)", **chk.rate(flops, bytes_, t_r)})


# ----------------------------------------------------------------------------------------------- attention

def section_attention(chk: Check, deadline):
    kernel = "splash" if chk.platform == "tpu" else "triton"
    if chk.smoke:
        B, H, Dk, Dv, sizes = 1, 1, 32, 32, [64]
    else:
        B, H, Dk, Dv, sizes = 1, 32, 192, 128, [4096, 16384, 32768]

    def fns(impl):
        kw = dict(impl=impl)
        if impl == kernel:
            # the kernel itself (interpreted only in smoke mode), not the dispatch
            fn = attention_splash if impl == "splash" else attention_triton
            f = lambda q, k, v: fn(q, k, v, interpret=chk.interpret)  # noqa: E731
        else:
            f = lambda q, k, v: attention(q, k, v, **kw)  # noqa: E731

        def fwd_bwd(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return o, vjp(do)

        return jax.jit(f), jax.jit(fwd_bwd)

    impls = {kernel: fns(kernel), "xla": fns("xla"), "reference": fns("reference")}

    def one(T):
        ks = jax.random.split(jax.random.key(T), 4)
        q, k = (jax.random.normal(kk, (B, T, H, Dk), jnp.bfloat16) for kk in ks[:2])
        v = jax.random.normal(ks[2], (B, T, H, Dv), jnp.bfloat16)
        do = jax.random.normal(ks[3], (B, T, H, Dv), jnp.bfloat16)
        flops = 2 * B * H * T * T / 2 * (Dk + Dv)
        bytes_ = 2 * B * T * H * (2 * Dk + 2 * Dv)
        f, fb = impls[kernel]
        f = chk.require_kernel(f"attention {kernel} forward (T={T})", f, q, k, v)
        fb = chk.require_kernel(f"attention {kernel} forward+backward (T={T})", fb, q, k, v, do)
        out, times = {}, {}
        for name, (fn, fnb) in impls.items():
            if name == "reference" and T > min(chk.ref_max_t, 8192):
                continue
            if name == kernel:
                fn, fnb = f, fb
            out[name] = fnb(q, k, v, do)
            times[name] = (chk.time(fn, q, k, v), chk.time(fnb, q, k, v, do))
        oracle = "reference" if "reference" in out else "xla"
        for name in times:
            row = {"T": T, "impl": name}
            if name != oracle:
                row.update(oracle=oracle, err_o=error_ratio(out[oracle][0], out[name][0]),
                           err_grads=error_ratio(out[oracle][1], out[name][1]))
            row["fwd"] = chk.rate(flops, bytes_, times[name][0])
            row["fwd_bwd"] = chk.rate(3.5 * flops, 2 * bytes_, times[name][1])
            chk.add("attention", row)

    _sweep(chk, sizes, deadline, one)


# ----------------------------------------------------------------------------------------------- MLA over a cache

def section_mla_cache(chk: Check, deadline):
    if chk.smoke:
        B, H, n, P, R, dv, cases = 1, 2, 8, 4, 32, 8, [(16, 64), (1, 64)]
    else:  # (queries, cached tokens): prefill pieces and a decode step of 64 rows
        B, H, n, P, R, dv, cases = 1, 32, 128, 64, 512, 128, [(2048, 32768), (8192, 131072), (1, 131072)]
    ks = jax.random.split(jax.random.key(9), 4)
    w_uk = (jax.random.normal(ks[0], (H, n, R)) / math.sqrt(R)).astype(jnp.bfloat16)
    w_uv = (jax.random.normal(ks[1], (H, R, dv)) / math.sqrt(R)).astype(jnp.bfloat16)
    scale = (n + P) ** -0.5

    def absorbed(q_nope, q_pe, ckv, kpe, lengths):
        q_lat = jnp.einsum("bthn,hnr->bthr", q_nope, w_uk, preferred_element_type=jnp.float32).astype(q_nope.dtype)
        o, lse = latent_attention(q_lat, q_pe, ckv, kpe, lengths, scale=scale)
        return jnp.einsum("bthr,hrv->bthv", o, w_uv, preferred_element_type=jnp.float32).astype(o.dtype), lse

    def expanded(*args):
        return decompressed_latent_attention(*args, w_uk, w_uv, scale=scale)

    fns = {"absorbed": jax.jit(absorbed), "expanded": jax.jit(expanded)}

    def one(case):
        T, S = case
        rows = 64 if (T == 1 and not chk.smoke) else B
        kk = jax.random.split(jax.random.key(T + S), 4)
        q_nope = jax.random.normal(kk[0], (rows, T, H, n), jnp.bfloat16)
        q_pe = jax.random.normal(kk[1], (rows, T, H, P), jnp.bfloat16)
        ckv = jax.random.normal(kk[2], (rows, S, R), jnp.bfloat16)
        kpe = jax.random.normal(kk[3], (rows, S, P), jnp.bfloat16)
        lengths = jnp.full((rows,), S, jnp.int32)
        outs, times = {}, {}
        for name, fn in fns.items():
            outs[name] = fn(q_nope, q_pe, ckv, kpe, lengths)
            times[name] = chk.time(fn, q_nope, q_pe, ckv, kpe, lengths)
        rule = "expanded" if expanded_pays_off(T, heads=H, nope_dim=n, rope_dim=P, v_dim=dv, kv_lora_rank=R) \
            else "absorbed"
        pairs = rows * T * S * H
        for name in fns:
            flops = pairs * 2 * ((n + P + dv) if name == "expanded" else (2 * R + P)) + \
                (rows * S * H * R * 2 * (n + dv) if name == "expanded" else 0)
            bytes_ = 2 * rows * S * (R + P) + 2 * rows * T * H * (n + P + dv)
            row = {"queries": T, "cached": S, "rows": rows, "form": name, "rule_picks": rule,
                   **chk.rate(flops, bytes_, times[name])}
            if name == "expanded":
                row["err_vs_absorbed"] = error_ratio(outs["absorbed"][0], outs["expanded"][0])
                row["speedup_vs_absorbed"] = times["absorbed"] / times["expanded"]
            chk.add("mla_cache", row)

    for case in cases:
        if time.perf_counter() > deadline:
            print(f"  (stopping before {case}: out of this section's time)", flush=True)
            return
        one(case)


# ----------------------------------------------------------------------------------------------- INT4

def section_int4(chk: Check, deadline):
    if chk.smoke:
        dense = [(8, 64, 128)]
        grouped = (32, 64, 128, 4)
    else:   # 48B widths: dense MLP 2304 -> 9216, experts 2304 -> 1024 (decode and prefill row counts)
        dense = [(8, 2304, 9216), (64, 2304, 9216), (4096, 2304, 9216)]
        grouped = (8192, 2304, 1024, 32)
    for M, K, N in dense:
        kx, kw = jax.random.split(jax.random.key(M + K + N))
        x = jax.random.normal(kx, (M, K), jnp.bfloat16)
        w = jax.random.normal(kw, (K, N), jnp.float32) / math.sqrt(K)
        qw = quantize_int4(w)
        wb = w.astype(jnp.bfloat16)
        f = jax.jit(lambda x, qw: int4_matmul(x, qw, impl="pallas", interpret=chk.interpret))
        f = chk.require_kernel(f"int4_matmul (M={M}, K={K}, N={N})", f, x, qw)
        bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
        ref = jnp.dot(x.astype(jnp.float32), dequantize_int4(qw, jnp.float32))
        flops = 2 * M * K * N
        t_q, t_b = chk.time(f, x, qw), chk.time(bf16, x, wb)
        chk.add("int4", {"op": "dense", "M": M, "K": K, "N": N, "impl": "int4 pallas",
                         "err": error_ratio(ref, f(x, qw)),
                         **chk.rate(flops, qw.nbytes + 2 * (M * K + M * N), t_q)})
        chk.add("int4", {"op": "dense", "M": M, "K": K, "N": N, "impl": "bf16 dot",
                         **chk.rate(flops, wb.nbytes + 2 * (M * K + M * N), t_b)})
    M, K, N, E = grouped
    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (M, K), jnp.bfloat16)
    w = jax.random.normal(kw, (E, K, N), jnp.float32) / math.sqrt(K)
    sizes = jax.random.dirichlet(kg, jnp.ones(E)) * M
    group_sizes = jnp.floor(sizes).astype(jnp.int32).at[0].add(M - jnp.floor(sizes).astype(jnp.int32).sum())
    qw = quantize_int4(w)
    wb = w.astype(jnp.bfloat16)
    f = jax.jit(lambda x, qw, gs: int4_ragged_dot(x, qw, gs, impl="pallas", interpret=chk.interpret))
    f = chk.require_kernel(f"int4_ragged_dot (M={M}, E={E})", f, x, qw, group_sizes)
    bf16 = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(x.dtype))
    ref = jax.lax.ragged_dot(x.astype(jnp.float32), dequantize_int4(qw, jnp.float32), group_sizes)
    flops = 2 * M * K * N
    t_q, t_b = chk.time(f, x, qw, group_sizes), chk.time(bf16, x, wb, group_sizes)
    chk.add("int4", {"op": "grouped", "M": M, "K": K, "N": N, "E": E, "impl": "int4 pallas",
                     "err": error_ratio(ref, f(x, qw, group_sizes)),
                     **chk.rate(flops, qw.nbytes + 2 * (M * K + M * N), t_q)})
    chk.add("int4", {"op": "grouped", "M": M, "K": K, "N": N, "E": E, "impl": "bf16 ragged_dot",
                     **chk.rate(flops, wb.nbytes + 2 * (M * K + M * N), t_b)})


# ----------------------------------------------------------------------------------------------- training step

def training_step(config, seq_len: int, batch: int, seed: int = 0):
    """(jitted step, model, optimizer state, inputs, targets) for one training step of `config`: next-token
    cross-entropy, nnx.value_and_grad, AdamW. step(model, opt_state, inputs, targets) updates the model in place
    and returns (loss, gradients, new optimizer state). Written against the public model API: update it here when
    that API changes."""
    model = k2jax.KimiLinear(config, rngs=nnx.Rngs(seed))
    tx = optax.adamw(1e-5)
    opt_state = tx.init(nnx.state(model, nnx.Param))
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq_len + 1), 0, config.vocab_size)

    def loss_fn(model, inputs, targets):
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def step(model, opt_state, inputs, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, grads, opt_state

    return step, model, opt_state, tokens[:, :-1], tokens[:, 1:]


def section_train(chk: Check, deadline):
    if chk.smoke:
        name, T, batch, extra = "tiny", 16, 1, {}
    else:   # 48B widths; 32 routed experts (not 256) bound the memory and compile time of the check
        name, T, batch, extra = "kimi_linear_48b_a3b", 4096, 1, dict(num_experts=32)
    first = {}
    for impl in ("pallas", "chunk"):
        cfg = k2jax.load_config(name, num_hidden_layers=2, kda_layers=(1,), full_attn_layers=(2,), kda_impl=impl,
                                **extra)
        step, model, opt_state, inputs, targets = training_step(cfg, T, batch)
        try:   # the first step compiles; both impls start from the same weights
            loss, grads, opt_state = step(model, opt_state, inputs, targets)
            jax.block_until_ready(loss)
        except Exception as e:  # noqa: BLE001
            raise KernelFailure(f"training step with kda_impl={impl!r} failed: {type(e).__name__}: {e}") from e
        first[impl] = (float(loss), grads)
        times = []
        for _ in range(max(chk.repeats, 2)):
            t = time.perf_counter()
            loss, _, opt_state = step(model, opt_state, inputs, targets)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t)
        if not (math.isfinite(first[impl][0]) and math.isfinite(float(loss))):
            raise KernelFailure(f"training step with kda_impl={impl!r}: non-finite loss")
        sec = float(np.median(times))
        chk.add("train", {"model": f"{name}, 2 layers, {cfg.num_experts} experts", "T": T, "kda_impl": impl,
                          "loss": first[impl][0], "grad_norm": float(optax.global_norm(grads)),
                          "tokens_s": T * batch / sec, **chk.rate(train_flops_per_token(cfg, T) * T * batch, 0, sec)})
        del model, opt_state, step
        if time.perf_counter() > deadline:
            print("  (no chunk comparison: out of this section's time)", flush=True)
            return
    (lp, gp), (lc, gc) = first["pallas"], first["chunk"]
    chk.add("train", {"compare": "pallas vs chunk (first step)", "loss_ratio": abs(lp - lc) / abs(lc),
                      "grad_err": error_ratio(gc, gp)})


RUNNERS = {"kda": section_kda, "step": section_step, "attention": section_attention, "mla_cache": section_mla_cache,
           "int4": section_int4, "train": section_train}


# ----------------------------------------------------------------------------------------------- report

def _cell(row, key):
    v = row.get(key)
    if isinstance(v, dict):
        parts = [f"{v['ms']:.2f} ms"]
        if "tflops" in v:
            parts.append(f"{v['tflops']:.3g} TF/s" + (f" ({100 * v['flops_frac']:.0f}%)" if "flops_frac" in v else ""))
        if "gbs" in v:
            parts.append(f"{v['gbs']:.3g} GB/s" + (f" ({100 * v['bw_frac']:.0f}%)" if "bw_frac" in v else ""))
        return ", ".join(parts)
    return "" if v is None else _fmt(v)


def markdown(chk: Check) -> str:
    lines = [f"Device check on {chk.kind or chk.platform} ({chk.platform}), jax {jax.__version__}, "
             f"{'smoke (interpreted kernels)' if chk.smoke else 'compiled kernels'}; peaks: "
             + (f"{chk.peak_flops / 1e12:.0f} TFLOP/s bf16, {chk.peak_bw / 1e12:.2f} TB/s" if chk.peak_flops
                else "unknown device (raw numbers only)") + f"; {chk.elapsed():.0f} s.", ""]
    for section, rows in chk.rows.items():
        keys = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        lines += [f"### {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r, k) for k in keys) + " |" for r in rows]
        lines.append("")
    for f in chk.failures:
        lines.append(f"FAILED {f['section']}: {f['message']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                 "device_check.json"), help="JSON results path")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted: runs on CPU")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sections (default 450)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 5; smoke 1)")
    p.add_argument("--ref-max-t", type=int, default=4096, help="longest T run through the per-token reference")
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown --sections {bad}; choose from {SECTIONS}")
    platform = jax.devices()[0].platform
    if platform == "cpu" and not a.smoke:
        print("device_check: no GPU or TPU visible (jax.devices() is CPU); use --smoke for the CPU dry run",
              file=sys.stderr)
        return 2
    chk = Check(a.smoke, a.budget, a.repeats or (1 if a.smoke else 5), a.ref_max_t)
    print(f"device_check: {chk.kind or chk.platform} ({chk.platform}), sections {sections}, budget {a.budget:.0f} s",
          flush=True)
    share = sum(SHARES[s] for s in sections)
    for s in sections:
        deadline = time.perf_counter() + a.budget * SHARES[s] / share
        print(f"== {s}", flush=True)
        t_section = time.perf_counter()
        try:
            RUNNERS[s](chk, deadline)
        except Exception as e:  # noqa: BLE001  every failure is recorded and makes the exit status 1
            msg = str(e) if isinstance(e, KernelFailure) else f"{type(e).__name__}: {e}"
            chk.failures.append({"section": s, "message": msg, "traceback": traceback.format_exc()})
            print(f"FAILED {s}: {msg}", file=sys.stderr, flush=True)
        chk.section_s[s] = time.perf_counter() - t_section
        print(f"   {s}: {chk.section_s[s]:.1f} s", flush=True)
    report = markdown(chk)
    print("\n" + report)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": {"platform": chk.platform, "device_kind": chk.kind, "jax": jax.__version__, "smoke": chk.smoke},
        "peak": {"bf16_flops": chk.peak_flops, "hbm_bytes_per_s": chk.peak_bw},
        "elapsed_s": chk.elapsed(), "section_s": chk.section_s, "sections": chk.rows, "failures": chk.failures,
        "markdown": report,
    }, indent=1, default=float))
    print(f"wrote {out}")
    if chk.failures:
        print(f"device_check: {len(chk.failures)} FAILED: " + "; ".join(f["message"][:200] for f in chk.failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
