"""Several processes started by torchrun (one per GPU, on one machine or several): joining the
process group and the few collectives train.py and generate.py need. A plain `python script.py`
joins no group, and every helper here then acts for one process.

Data parallelism (DDP, train.py): every process holds the whole model, runs its own share of each
global batch, and the gradients are averaged across processes (an all-reduce during backward) before
each identical optimizer step. Corpus summarization (generate.py) deals batches of documents out to
the processes. torchrun starts the processes and tells each its place through the environment (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); nanoGPT's train.py has the same shape.

    torchrun --nproc_per_node 4 train.py ...        # or generate.py --file docs.jsonl --output out.jsonl
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def setup_distributed(device: str) -> tuple[int, int, int, str]:
    """Join torchrun's process group if started by torchrun: (rank, local_rank, world_size, device).
    On GPUs each process takes the GPU numbered by its local rank and talks over NCCL; on CPUs, gloo."""
    if "RANK" not in os.environ:
        return 0, 0, 1, device  # a plain `python train.py`: one process, no group
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    # Process 0 evaluates while the others wait in their next all-reduce: allow a long evaluation
    # (the default timeout is 10 minutes for NCCL).
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), local_rank, dist.get_world_size(), device


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def mean_over_processes(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)  # gloo and NCCL both reduce a CPU/GPU float64 fine
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def gather_objects(x) -> list:
    """[x of process 0, x of process 1, ...] on every process (one collective: all must call it)."""
    if not dist.is_initialized():
        return [x]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out
