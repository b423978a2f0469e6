"""Data-parallel training through the Trainer's DDP, on 2 CPU processes (gloo).

What each test proves:
- two_processes_match_one_with_the_same_global_batch: 2 processes x 8 rows train the same weights as 1 process x 16
  rows (4 steps, random sampler, float32, class names of 3, 3 and 10 answer tokens, so the processes hold unequal
  token counts) within float tolerance, which checks gradient synchronisation and loss normalisation; the images are
  encoded once, by rank 0, which writes the feature cache that rank 1 reads.
- label_prior_views_are_encoded_once_by_rank_0: with the label prior on, rank 0 encodes the images and their two
  shifted views into the cache and rank 1 reads all of them; both ranks fit the same gate.
- each_torchrun_rank_loads_onto_its_own_gpu: with LOCAL_RANK=r on a 4-GPU machine (CUDA stubbed: none here),
  `attach`'s device is cuda:r.
"""

from __future__ import annotations

import json
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
    ddp = subprocess.run(  # an empty feature cache of its own: the images must be encoded once, by rank 0
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         WORKER, llm_dir, vit_dir, str(tmp_path / "two"), "8"],
        env=dict(env, VLM_ADAPTERS_TEST_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    encoded = [json.loads((tmp_path / "two" / f"encoded-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert encoded == [48, 0]  # the 48 images once, by rank 0, which wrote the cache; rank 1 read it
    def flat(run: str) -> torch.Tensor:  # the trained weights (the feature statistics are set, not trained)
        tensors = []
        for name in ("projector.safetensors", "adapter_model.safetensors"):
            weights = load_file(tmp_path / run / name)
            tensors += [weights[key].flatten() for key in sorted(weights) if not key.startswith("feature_")]
        return torch.cat(tensors)

    init, one, two = flat("one/init"), flat("one/adapter"), flat("two/adapter")
    torch.testing.assert_close(init, flat("two/init"))  # same start
    drift = (two - one).norm() / (one - init).norm()
    assert drift < 1e-3, f"2-process run differs from 1-process run by {drift:.2e} of the update"
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4)  # the largest element of the update is ~1e-2


def test_label_prior_views_are_encoded_once_by_rank_0(tmp_path, llm_dir, vit_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", VLM_ADAPTERS_TEST_CACHE=str(tmp_path / "cache"))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
         WORKER, llm_dir, vit_dir, str(tmp_path / "two"), "8", "prior"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    encoded = [json.loads((tmp_path / "two" / f"encoded-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert encoded == [48 * 3, 0]  # 48 images and their 2 shifted views each, by rank 0 only
    gates = [json.loads((tmp_path / "two" / f"gate-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert gates[0] == gates[1]


RANK_DEVICE = """
import os
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
