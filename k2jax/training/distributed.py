"""Multi-host helpers of the training loop: `jax.distributed` start-up, an all-gather of JSON values, and decisions
taken once on process 0 and shared with every process."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from k2jax.config import ConfigError


# ---- multi-host -----------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start jax.distributed from the arguments, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID. Returns True when running multi-process. Uses gloo for CPU collectives. Must run before any
    other JAX call."""

    env = os.environ
    addr = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if addr is None:
        return False
    n = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if n is None or pid is None:
        raise ConfigError("multi-host: a coordinator address is set but the number of processes or the process id "
                          "is missing (train.num_processes / train.process_id or JAX_NUM_PROCESSES / "
                          "JAX_PROCESS_ID)")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid))
    return True


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: every process must call it)."""

    if jax.process_count() == 1:
        return [obj]

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(everyone[i, :sizes[i]]).decode()) for i in range(len(sizes))]


def decided_once(decide: Callable[[], dict]) -> dict:
    """`decide()` run on process 0 only and its answer given to every process, so that all take the same
    decision. An exception on process 0 is raised there and reported to the others as a RuntimeError."""

    if jax.process_count() == 1:
        return decide()
    plan = None
    if jax.process_index() == 0:
        try:
            plan = decide()
        except BaseException as e:
            allgather_json({"action": "failed", "message": f"{type(e).__name__}: {e}"})
            raise
    plan = allgather_json(plan)[0]
    if plan["action"] == "failed":
        raise RuntimeError(f"process 0 could not read the checkpoints: {plan['message']}")
    return plan
