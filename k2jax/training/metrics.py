"""Training metrics: the FLOP count behind MFU, the peak rate it is measured against, and the JSONL /
TensorBoard writers.

FLOPs per trained token (`train_flops_per_token`), forward + backward = 3 x forward:
    forward = 2 * N_matmul                                  every weight a token multiplies once (2 FLOPs per MAC)
            + sum over MLA layers  2 * H * (d_qk + d_v) * T / 2      scores and weighted values, causal: mean
                                                                      context T / 2
            + sum over KDA layers  6 * H_kda * K * V                 per token of the delta rule: S^T k, the rank-1
                                                                      update and q^T S (3 products of H K V MACs)
    N_matmul = active parameters (config's `count_params`: routed experts counted top-k times, shared experts,
               routers and lm_head included) minus the embedding table (a lookup, no FLOPs); with tied embeddings
               the table is the lm_head and stays in.
MFU = train_flops_per_token * tokens/s / (peak FLOP/s per device * devices). Norms, activations, the KDA gates and
the chunked form's extra intra-chunk work are not counted (the usual "model FLOPs" convention).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

from k2jax.model import count_params

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (only used when train.peak_flops is not given).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def train_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward) of a `config` model at sequence length `seq_len`."""

    counts = count_params(config)
    n_matmul = counts["active"] - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    fwd = 2.0 * n_matmul
    for kind in config.layer_types:
        if kind == "mla":
            fwd += 2.0 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
        else:
            fwd += 6.0 * config.kda_num_heads * config.kda_head_dim * config.kda_head_dim
    return 3.0 * fwd


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the default device on an n x n x n float32 matmul (best of `repeats`): the CPU "peak" for MFU."""

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(configured: float | None) -> float | None:
    """`configured` if given; else the data-sheet peak of a known accelerator, or the measured matmul rate on CPU;
    None when unknown (MFU is then not reported)."""
    if configured:
        return float(configured)

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_matmul_flops()
    kind = getattr(dev, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def expert_load_stats(expert_load) -> dict:
    """expert_load [n_moe_layers, E] (assignments per expert) -> {'moe_max_load': max over layers of
    max/mean load (1 = perfectly balanced), 'moe_min_load': min over layers of min/mean load}."""
    load = np.asarray(expert_load, np.float64)
    if load.size == 0:
        return {}
    mean = np.maximum(load.mean(-1, keepdims=True), 1e-9)
    return {"moe_max_load": float((load / mean).max()), "moe_min_load": float((load / mean).min())}


class MetricsWriter:
    """Appends one JSON object per logged step to `run_dir/metrics.jsonl` and scalars to TensorBoard event files
    in `run_dir/tensorboard` (tensorboardX). Only process 0 writes; other processes get a no-op writer."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Record `metrics` (name -> number or list) for `step`; non-scalar values go to the JSONL only."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": prefix, "time": time.time()}
        for k, v in metrics.items():
            record[k] = v.tolist() if isinstance(v, np.ndarray) else v
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
