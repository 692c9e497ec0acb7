"""Where the fan-out tasks run: Prefect's thread pool in the flow's own process (``local``, the default), or Ray.

The choice is made once per process, before the flows are imported, from the environment:
``AGENT_FORGE_TASK_RUNNER=local|ray`` and, to join a running cluster (``ray start --head`` elsewhere),
``AGENT_FORGE_RAY_ADDRESS``. `agent-forge run FLOW --task-runner ray [--address ADDR]` sets both; a deployment
sets them as job variables (``env``). Without an address, Ray starts a local instance sized to the machine.

Tasks pass ``ArtifactRef``s, never tensors, so nothing large crosses Ray's object store: every worker reads and
writes the same store root (a path all of them see). A Ray worker reports to the Prefect API the flow reports to,
which it learns from ``PREFECT_API_URL`` in its environment; the CLI starts a Prefect server for the run when
none is configured, as a worker cannot reach a flow's in-process one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

RUNNER_ENV = "AGENT_FORGE_TASK_RUNNER"
ADDRESS_ENV = "AGENT_FORGE_RAY_ADDRESS"
KINDS = ("local", "ray")
SHARED_ENV = ("PREFECT_", "AGENT_FORGE_", "WANDB_", "HF_", "DO_NOT_TRACK")


def runner_kind() -> str:
    kind = os.environ.get(RUNNER_ENV, "local") or "local"
    if kind not in KINDS:
        raise ValueError(f"{RUNNER_ENV}={kind!r}: the task runner is one of {', '.join(KINDS)}")
    return kind


def task_runner() -> TaskRunner:
    """The task runner of a flow that fans out (prepare's downloads, Cognate's specialists, EvoMerge's fitness)."""
    if runner_kind() == "local":
        return ThreadPoolTaskRunner()
    from prefect_ray import RayTaskRunner

    from phases.common.resources import usable_cpus

    address = os.environ.get(ADDRESS_ENV) or None
    if address:
        # a head started by `ray start` turns on token authentication unless told otherwise; a driver that joins it
        # must send the token (~/.ray/auth_token, or RAY_AUTH_TOKEN), which it does in token mode
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # a local instance: this machine's usable cores, no dashboard (a web server a batch run never opens)
    init = {} if address else {"num_cpus": usable_cpus(), "include_dashboard": False}
    # a cluster's workers were started with their own environment: they get this run's Prefect API, result
    # storage, store root and offline switches from the job
    shared = {k: v for k, v in os.environ.items() if k.startswith(SHARED_ENV)}
    return RayTaskRunner(address=address, init_kwargs=init | {"runtime_env": {"env_vars": shared}})


@contextmanager
def claim(device: str, cpus: float = 1.0) -> Iterator[None]:
    """Tasks submitted inside ask Ray for one GPU when ``device`` is CUDA, else for ``cpus`` cores; Ray starts each
    when a worker has them free. The local runner has no scheduler to tell: nothing changes."""
    if runner_kind() != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(**({"num_gpus": 1} if device == "cuda" else {"num_cpus": cpus})):
        yield
