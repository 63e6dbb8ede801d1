"""Peak host memory and throughput of k2jax.hf.load_hf_checkpoint on a synthetic checkpoint of about 1 GB.

    python bench/hf_load.py                 # ~1 GB float32, 4 shards, warm and cold page cache (~1 minute)
    python bench/hf_load.py --size-gb 0.25

A hybrid Kimi-Linear config (KDA + MLA, 16 routed experts) is scaled in depth to the requested size and written as
an HF folder of random tensors (written streaming, never all in memory). Each measurement runs in a fresh
subprocess: after importing JAX and initialising the CPU backend it records the resident set (VmRSS), resets the
peak (writing 5 to /proc/self/clear_refs), loads the checkpoint (all arrays ready), and reads the peak (VmHWM).
'extra peak' = peak - baseline, which includes the loaded model itself (on CPU the device memory is host memory),
so 1.0x is the floor. 'cold' evicts the files from the page cache first (posix_fadvise DONTNEED).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LIMIT = 1.3  # acceptance bound on extra peak / checkpoint size


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def synthetic_config(size_gb: float):
    """A hybrid config whose float32 checkpoint is about `size_gb` GB (layers added until it is)."""
    import math

    from flax import nnx

    from k2jax import load_config
    from k2jax.model import KimiLinear

    def n_params(cfg):
        abstract = nnx.eval_shape(lambda: KimiLinear(cfg, rngs=nnx.Rngs(0)))
        return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Variable)))

    base = load_config("tiny").replace(
        name="bench", vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
        num_key_value_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        kda_num_heads=8, kda_head_dim=128, num_experts=16, num_experts_per_token=2, moe_intermediate_size=512,
        num_expert_group=1, topk_group=1)
    for layers in range(1, 200):
        kda = tuple(i for i in range(1, layers + 1) if i % 4)
        cfg = base.replace(num_hidden_layers=layers, kda_layers=kda,
                           full_attn_layers=tuple(i for i in range(1, layers + 1) if i not in kda))
        if n_params(cfg) * 4 >= size_gb * 1e9:
            return cfg
    raise ValueError(f"--size-gb {size_gb} is too large for this benchmark")


def write_checkpoint(folder: Path, config, shard_bytes: int = 256 * 2**20) -> int:
    """Random float32 tensors in HF names/layouts (sharded, with an index). Returns the data bytes."""
    import numpy as np
    from flax import nnx

    from k2jax.hf import hf_config_dict
    from k2jax.hf.names import DEEPSEEK_V3, KIMI_LINEAR, tensor_maps
    from k2jax.hf.safetensors import write_safetensors
    from k2jax.hf.save import plan_shards
    from k2jax.model import KimiLinear

    abstract = nnx.eval_shape(lambda: KimiLinear(config, rngs=nnx.Rngs(0)))
    maps = tensor_maps(list(nnx.to_flat_state(nnx.state(abstract, nnx.Variable))),
                       KIMI_LINEAR if config.kda_layers is not None else DEEPSEEK_V3)
    nbytes = {tm.hf_name: 4 * int(np.prod(tm.hf_shape)) for tm in maps}
    shards = plan_shards(maps, nbytes, shard_bytes)
    rng = np.random.default_rng(0)
    by_name = {tm.hf_name: tm for tm in maps}
    folder.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, [(tm.hf_name, "F32", tm.hf_shape) for tm in shard],
                          lambda n: rng.standard_normal(by_name[n].hf_shape, dtype=np.float32) * 0.02)
        weight_map.update({tm.hf_name: fname for tm in shard})
    total = sum(nbytes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config)))
    return total


def _evict(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(folder: str) -> None:
    """Measure one load in this (fresh) process and print a JSON line."""
    import jax

    from k2jax.hf import load_hf_checkpoint

    jax.devices()
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start, cpu0 = time.perf_counter(), time.process_time()
    model = load_hf_checkpoint(folder)
    from flax import nnx

    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print(json.dumps({"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "seconds": seconds, "cpu": cpu}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "ckpt"
        config = synthetic_config(args.size_gb)
        t0 = time.perf_counter()
        total = write_checkpoint(folder, config)
        print(f"synthetic checkpoint: {config.num_hidden_layers} layers, {total / 1e9:.3f} GB float32, "
              f"{len(list(folder.glob('*.safetensors')))} shards, written in {time.perf_counter() - t0:.1f} s")
        rows = []
        for mode in ("warm", "cold"):
            if mode == "cold":
                _evict(folder)
            out = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = (r["peak_kb"] - r["baseline_kb"]) * 1024
            rows.append((mode, r["baseline_kb"] / 2**20, r["peak_kb"] / 2**20, extra / total, r["seconds"],
                         total / r["seconds"] / 1e9, r["cpu"], total / r["cpu"] / 1e9))
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times suffer when it is high)")
    print("| page cache | baseline RSS GiB | peak RSS GiB | extra peak / size | load s | GB/s | CPU s | GB per CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, base, peak, ratio, secs, gbs, cpu, gbc in rows:
        print(f"| {mode} | {base:.2f} | {peak:.2f} | {ratio:.2f}x | {secs:.2f} | {gbs:.2f} | {cpu:.2f} | {gbc:.2f} |")
    worst = max(r[3] for r in rows)
    print(f"\nworst extra peak / size = {worst:.2f}x (limit {LIMIT}x): {'OK' if worst < LIMIT else 'OVER'}")
    return 0 if worst < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
