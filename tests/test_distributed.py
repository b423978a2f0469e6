"""Data-parallel training through the Trainer's DDP: 2 CPU processes (gloo) match 1 process with the
same global batch. The global batch is the whole 16-example set, so the comparison checks gradient
synchronisation and loss normalisation, not the samplers' shuffling."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, llm_dir, vit_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, WORKER, llm_dir, vit_dir, str(tmp_path / "one"), "16"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         WORKER, llm_dir, vit_dir, str(tmp_path / "two"), "8"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    def flat(run: str) -> torch.Tensor:
        tensors = []
        for name in ("projector.safetensors", "adapter_model.safetensors"):
            weights = load_file(tmp_path / run / name)
            tensors += [weights[key].flatten() for key in sorted(weights)]
        return torch.cat(tensors)

    init, one, two = flat("one/init"), flat("one/adapter"), flat("two/adapter")
    torch.testing.assert_close(init, flat("two/init"))  # same start
    # Adam turns float-level differences in near-zero gradients into full steps for a few
    # elements, so compare the runs' updates as a whole: they must agree to within 5 %.
    drift = (two - one).norm() / (one - init).norm()
    assert drift < 0.05, f"2-process run differs from 1-process run by {drift:.1%} of the update"


RANK_DEVICE = """
import os
import pytest
import torch
import torch.distributed as dist

# This machine has no GPU: stub the CUDA runtime and the process group (the boundary it cannot reach);
# accelerate's own rank -> device logic runs unchanged.
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 4
torch.cuda.set_device = lambda device: None
dist.is_available = lambda: True
dist.init_process_group = lambda *args, **kwargs: None
dist.is_initialized = lambda: True
dist.get_world_size = lambda *args, **kwargs: int(os.environ["WORLD_SIZE"])
dist.get_rank = lambda *args, **kwargs: int(os.environ["RANK"])
from vlm_adapters.llm import resolve_device

print(resolve_device(None))
"""


@pytest.mark.parametrize("rank", [0, 3])
def test_each_torchrun_rank_loads_onto_its_own_gpu(rank):
    """Under torchrun on a 4-GPU machine, rank r attaches to cuda:r (accelerate's PartialState), not
    to whatever the current CUDA device is."""
    env = dict(os.environ, WORLD_SIZE="4", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="4",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    done = subprocess.run([sys.executable, "-c", RANK_DEVICE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"cuda:{rank}"
