"""Which GPUs each teacher replica of a local pipeline runs on.

distilabel runs every replica of a step in a process of its own. Its placement (``CudaDevicePlacementMixin``)
covers its own LLM classes only, and keeps its assignments in a file under the temporary folder that a killed run
leaves behind (the next run then finds those GPUs taken); the project's vLLM teacher is not one of them, so without
a plan every engine starts on GPU 0 (two tensor-parallel-4 replicas both on GPUs 0-3). Here the main process plans
the whole pipeline before it starts, from the GPUs it can see, and each replica's process sets
``CUDA_VISIBLE_DEVICES`` to its share before it loads anything. On Ray, Ray places the actors (distilabel asks it
for each step's GPUs, :func:`devices_on_cluster`) and no plan is made.
"""

import logging
import os
from dataclasses import dataclass

from magpie_teach.errors import ConfigError

logger = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as a child's ``CUDA_VISIBLE_DEVICES`` names them (indices, or the UUIDs the
    parent's own setting uses), counted without initialising CUDA here."""
    from magpie_teach.modeling import cuda_visible

    if not cuda_visible():
        return []
    import torch

    count = torch.cuda.device_count()  # NVML-based (cuda_visible set PYTORCH_NVML_BASED_CUDA_CHECK): no CUDA init
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in parent.split(",") if d.strip()] if parent else [str(i) for i in range(count)]
    return names[:count]


@dataclass(frozen=True)
class GpuDemand:
    """One teacher's GPUs: REPLICAS copies of GPUS GPUs each. An EXCLUSIVE one (a vLLM engine, which takes most of a
    GPU's memory for its cache) never shares a GPU; a transformers teacher may."""

    teacher: str
    gpus: int
    replicas: int
    exclusive: bool


def plan_gpus(demands: list[GpuDemand], gpus: list[str]) -> dict[str, list[str]]:
    """Per teacher, the GPUs of each replica (index = replica number) as ``CUDA_VISIBLE_DEVICES`` lists them
    (``"0,1,2,3"``; distilabel's step signature takes no nested list). Exclusive demands take consecutive GPUs in
    the order given (the GPUs of one tensor-parallel engine sit side by side); a ConfigError naming every demand
    when they ask for more GPUs than there are. The others take one GPU per replica, in turn among the GPUs left
    (among all of them, with a warning, when the exclusive ones took every GPU)."""
    plan: dict[str, list[str]] = {}
    asked = sum(d.gpus * d.replicas for d in demands if d.exclusive)
    if asked > len(gpus):
        wants = ", ".join(f"{d.teacher}: {d.replicas} x {d.gpus}" for d in demands if d.exclusive)
        raise ConfigError(f"the vLLM teachers need {asked} GPUs at once ({wants}: replicas x tensor_parallel_size) "
                          f"but this machine has {len(gpus)} visible; lower replicas or tensor_parallel_size, or "
                          "run on a Ray cluster (ray:)")  # fmt: skip
    taken = 0
    for demand in (d for d in demands if d.exclusive):
        plan[demand.teacher] = []
        for _ in range(demand.replicas):
            plan[demand.teacher].append(",".join(gpus[taken : taken + demand.gpus]))
            taken += demand.gpus
    shared = [d for d in demands if not d.exclusive]
    pool = gpus[taken:] or gpus
    if shared and not gpus[taken:]:
        logger.warning("the vLLM teachers take every GPU: the transformers teachers share them (%s)", ", ".join(gpus))
    turn = 0
    for demand in shared:
        plan[demand.teacher] = []
        for _ in range(demand.replicas):
            plan[demand.teacher].append(pool[turn % len(pool)])
            turn += 1
    return plan


def replica_of(identifier: str | None) -> int:
    """The replica number in distilabel's name for a step's LLM (``<step>-replica-<n>``), 0 when there is none."""
    if not identifier or "-replica-" not in identifier:
        return 0
    return int(identifier.rsplit("-replica-", 1)[1])


def take_gpus(by_replica: list[str] | None, identifier: str | None) -> None:
    """In a replica's process, before anything touches CUDA: keeps only this replica's GPUs visible (no plan: as
    it is)."""
    if not by_replica:
        return
    replica = replica_of(identifier)
    devices = by_replica[replica % len(by_replica)]
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    logger.info("%s: on GPU(s) %s", identifier or "replica 0", devices)


def devices_on_cluster(teachers: list, nodes: list[float]) -> dict[str, str]:
    """Each teacher's device on a Ray cluster whose alive nodes have NODES GPUs, decided by the cluster and not by
    this driver (often a head or a laptop without GPUs): ``auto`` is ``cuda`` when a node has a GPU (its actors then
    ask Ray for one per replica, a vLLM engine for ``tensor_parallel_size``), else ``cpu``. A ConfigError naming the
    teacher for ``cuda`` on a cluster without GPUs, for ``cuda:N`` (Ray chooses the GPUs), and when the GPU teachers
    ask more GPUs than the cluster has, or one replica more than its largest node (Ray would wait for ever for
    actors it cannot place, their logs hidden)."""
    devices, demands = {}, []  # (teacher, GPUs of one replica, replicas)
    for i, teacher in enumerate(teachers):
        if teacher.backend == "openai":
            continue
        device = teacher.device
        if device.startswith("cuda:"):
            raise ConfigError(f"teachers[{i}].device: {device!r}: on a Ray cluster Ray chooses each actor's GPUs; "
                              "use cuda or auto")  # fmt: skip
        if device == "auto":
            device = "cuda" if any(nodes) else "cpu"
        if device == "cuda" and not any(nodes):
            raise ConfigError(f"teachers[{i}].device: cuda, but the Ray cluster has no GPU (its {len(nodes)} "
                              "node(s) offer none); use auto or cpu, or add GPU nodes")  # fmt: skip
        devices[teacher.name] = device
        if device == "cuda":
            gpus = teacher.tensor_parallel_size if teacher.backend == "vllm" else 1
            demands.append((teacher.name, gpus, teacher.replicas))
    asked = sum(gpus * replicas for _, gpus, replicas in demands)
    if asked > sum(nodes):
        wants = ", ".join(f"{name}: {replicas} x {gpus}" for name, gpus, replicas in demands)
        raise ConfigError(f"the GPU teachers need {asked:g} GPUs at once ({wants}: replicas x GPUs each) but the Ray "
                          f"cluster has {sum(nodes):g}: its actors could never all start; lower replicas or "
                          "tensor_parallel_size")  # fmt: skip
    for name, gpus, _ in demands:  # a demand here means a node with GPUs
        if gpus > max(nodes):
            raise ConfigError(f"a replica of {name} needs {gpus} GPUs on one node, but the largest node of the Ray "
                              f"cluster has {max(nodes):g}; lower tensor_parallel_size")  # fmt: skip
    return devices
