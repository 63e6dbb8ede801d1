"""KDA state snapshots: device-resident copies of a slot's state in every KDA layer, taken at a token count.

A KDA layer's state after n tokens (the last W-1 pre-conv q/k/v inputs and the [H, K, V] float32 recurrent state,
`KDAState`) cannot be recovered from any later state, so to resume a sequence at token n the engine must have
copied the state when the sequence stood at n. `SnapshotStore` keeps such copies in a fixed number of device
buffers, `capacity` snapshots for all KDA layers together (memory is bounded and allocated once; nothing crosses
to the host), handed out by integer handles from a host free list:

    handles = store.save(kda_states, slots)           # copy the slots' current states (the store is donated)
    kda_states = store.restore(kda_states, slots, handles)   # a slot resumes from a snapshot (or from zeros)
    store.free(handles)                               # when the prefix cache drops them

`kda_states` is the tuple of the cache's per-layer `KDAState`s for the KDA layers only, in layer order, each
leaf with a leading slot dim. Snapshots are copies, so a slot that continues never changes a stored snapshot and a
snapshot restored into many slots is shared by none of them (copy on write, trivially). The pure functions
`save_states` / `restore_states` are what the class jits; an engine may fuse them into its own programs.
"""

from __future__ import annotations

import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.layers.kda import KDAState
from k2jax.sharding import logical_to_mesh_spec

NO_SNAPSHOT = -1


class SnapshotStoreFull(RuntimeError):
    """Every snapshot buffer is in use (the caller may evict cached snapshots and retry)."""


def num_kda_layers(config) -> int:
    return sum(kind == "kda" for kind in config.layer_types)


def snapshot_bytes(config) -> int:
    """Bytes of one snapshot: every KDA layer's 3 conv windows [W-1, H*K] (compute dtype) and recurrent state
    [H, K, K] float32."""
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.short_conv_kernel_size
    per_layer = 3 * (W - 1) * H * K * jnp.dtype(config.dtype).itemsize + H * K * K * 4
    return num_kda_layers(config) * per_layer


def store_logical_names(states):
    """Logical axis names for a tuple of KDAState with a leading snapshot (or slot) dim that is replicated: KDA
    channels on 'heads', as in the slot cache (so a copy between slot and snapshot moves no data across heads)."""
    names = KDAState((None, None, "heads"), (None, None, "heads"), (None, None, "heads"), (None, "heads", None, None))
    return tuple(names for _ in states)


def save_states(store, states, slots, handles):
    """store with store[l][handles[i]] := states[l][slots[i]] for every KDA layer l; rows with a negative handle
    are skipped. store, states: tuples of KDAState (leading dims capacity and num_slots); slots, handles: int [n]."""
    capacity = store[0].recurrent.shape[0] if store else 0
    dst = jnp.where(handles >= 0, handles, capacity)
    src = jnp.clip(slots, 0, None)
    return tuple(KDAState(*(s.at[dst].set(x[src], mode="drop") for s, x in zip(st, xs)))
                 for st, xs in zip(store, states))


def restore_states(states, store, slots, handles):
    """states with states[l][slots[i]] := store[l][handles[i]], or zeros where handles[i] == NO_SNAPSHOT (a
    sequence that starts from scratch); rows with a negative slot are skipped. Shapes as in `save_states`."""
    num_slots = states[0].recurrent.shape[0] if states else 0
    dst = jnp.where(slots >= 0, slots, num_slots)
    hit = handles >= 0
    src = jnp.clip(handles, 0, None)

    def put(x, s):
        rows = s[src]
        rows = jnp.where(hit.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))
        return x.at[dst].set(rows, mode="drop")

    return tuple(KDAState(*(put(x, s) for x, s in zip(xs, st))) for xs, st in zip(states, store))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SnapshotStore:
    """`capacity` device-resident KDA snapshots of a model built from `config` (see the module docstring).

    mesh: optional jax.sharding.Mesh: the buffers are placed with `store_logical_names` (heads over 'tensor').
    Calls pad their rows to a power of two, so at most log2(num_slots) + 1 programs are compiled per direction
    (`compile_count` counts them). Host bookkeeping is thread-safe; the device calls belong to the engine thread.
    """

    def __init__(self, config, capacity: int, *, mesh=None):
        if num_kda_layers(config) == 0:
            raise ValueError("SnapshotStore: the config has no KDA layer, so there is no state to snapshot")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"SnapshotStore: capacity={capacity!r} must be a positive integer")
        self.capacity = int(capacity)
        self.nbytes_per_snapshot = snapshot_bytes(config)
        one = KDAState.zeros(self.capacity, config)
        states = tuple(KDAState(*(jnp.array(a, copy=True) for a in one)) for _ in range(num_kda_layers(config)))
        self._shardings = None
        if mesh is not None:
            names = store_logical_names(states)
            self._shardings = jax.tree.map(
                lambda n, a: jax.sharding.NamedSharding(mesh, logical_to_mesh_spec(n, mesh, a.shape)), names, states,
                is_leaf=lambda x: isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))
            states = jax.device_put(states, self._shardings)
        self.states = states
        self.compile_count = 0
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out low handles first
        self._live: set[int] = set()
        self._lock = threading.Lock()
        kw = {} if self._shardings is None else {"out_shardings": self._shardings}
        self._save_jit = jax.jit(self._traced(save_states), donate_argnums=(0,), **kw)
        self._restore_jit = jax.jit(self._traced(restore_states), donate_argnums=(0,))

    def _traced(self, fn):
        def run(*args):
            self.compile_count += 1  # runs only while tracing
            return fn(*args)
        return run

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def bytes_in_use(self) -> int:
        return self.num_used * self.nbytes_per_snapshot

    def save(self, kda_states, slots: Sequence[int]) -> list[int]:
        """Copy the current KDA states of `slots` into fresh snapshots; returns their handles (one per slot).
        SnapshotStoreFull (and nothing taken) when fewer than len(slots) buffers are free."""
        slots = [int(s) for s in slots]
        with self._lock:
            if len(slots) > len(self._free):
                raise SnapshotStoreFull(f"the snapshot store has {len(self._free)} free buffers of {self.capacity}, "
                                        f"{len(slots)} were requested")
            handles = [self._free.pop() for _ in slots]
            self._live.update(handles)
        n = _pow2_at_least(len(slots))
        pad = n - len(slots)
        try:
            self.states = self._save_jit(self.states, kda_states, np.array(slots + [0] * pad, np.int32),
                                         np.array(handles + [NO_SNAPSHOT] * pad, np.int32))
        except Exception:
            self.free(handles)
            raise
        return handles

    def restore(self, kda_states, slots: Sequence[int], handles: Sequence[int]):
        """kda_states (donated) with each slots[i] set to snapshot handles[i], or to zeros where the handle is
        NO_SNAPSHOT (-1): a fresh start. Returns the new tuple of KDAState."""
        slots, handles = [int(s) for s in slots], [int(h) for h in handles]
        if len(slots) != len(handles):
            raise ValueError(f"restore: {len(slots)} slots but {len(handles)} handles")
        with self._lock:
            bad = [h for h in handles if h != NO_SNAPSHOT and h not in self._live]
        if bad:
            raise ValueError(f"restore: handles {bad[:8]} are not live snapshots (capacity {self.capacity})")
        n = _pow2_at_least(len(slots))
        pad = n - len(slots)
        return self._restore_jit(kda_states, self.states, np.array(slots + [-1] * pad, np.int32),
                                 np.array(handles + [NO_SNAPSHOT] * pad, np.int32))

    def free(self, handles: Sequence[int]) -> None:
        """Return snapshots to the free list (the prefix cache calls this when it drops them)."""
        with self._lock:
            handles = [int(h) for h in handles]
            bad = [h for h in handles if h not in self._live]
            if bad or len(set(handles)) != len(handles):
                raise ValueError(f"free: handles {bad[:8] or handles[:8]} are not live snapshots or repeat")
            self._live.difference_update(handles)
            self._free.extend(handles)
