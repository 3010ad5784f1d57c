"""A weight group formed by rank 0 of a multi-rank trainer started by torchrun.

Two ways this hung before: torch's tcp:// rendezvous under torchrun expects the elastic agent to
host the store, so nobody hosted the group's store (CPU and GPU); and with NCCL, a device-bound
default group made torch build the weight group by splitting the trainer's own communicator
(GPU only: the `gpu` case needs 2 GPUs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_hpc.registry import free_port

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import sys, torch, torch.distributed as dist
from areal_hpc.train.dist import init_distributed
from areal_hpc.train.weight_sync import init_weight_sync_group, send_tensors
role, port, name, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
device = "cuda" if backend == "nccl" else "cpu"
if role == "receiver":
    if device == "cuda":
        torch.cuda.set_device(0)
    group = init_weight_sync_group("127.0.0.1", port, 1, 2, name, backend=backend, timeout_s=60)
    t = torch.empty(1024, device=device)
    dist.broadcast(t, group_src=0, group=group)
    print("RESULT", float(t.sum()), flush=True)
else:
    info = init_distributed(timeout_s=60)  # on GPUs the default group is bound to this rank's GPU
    if info.rank == 0:
        group = init_weight_sync_group("127.0.0.1", port, 0, 2, name, backend=backend, timeout_s=60)
        send_tensors(group, [torch.arange(1024, dtype=torch.float32, device=device)])
    dist.all_reduce(torch.ones(1, device=device))  # the trainer's own group still works afterwards
    print("TRAINER_DONE", info.rank, flush=True)
    dist.destroy_process_group()  # as the trainer's entry does: all groups, the weight group too
"""


def _n_gpus() -> int:
    """Physical GPUs (the probe names them by index), whatever this pytest process was narrowed to."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_weight_group_from_rank0_of_a_torchrun_trainer(tmp_path, backend):
    if backend == "nccl" and _n_gpus() < 2:
        pytest.skip("needs 2 GPUs")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}", NCCL_CUMEM_ENABLE="0")
    gpu_env = {"CUDA_VISIBLE_DEVICES": str(min(2, _n_gpus() - 1)) if backend == "nccl" else ""}
    port, name = str(free_port()), "areal-weights-probe"
    receiver = subprocess.Popen([sys.executable, str(script), "receiver", port, name, backend], text=True,
                                env=dict(env, **gpu_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        trainer = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                  "--master_port", str(free_port()), str(script), "trainer", port, name, backend],
                                 env=dict(env, CUDA_VISIBLE_DEVICES="0,1" if backend == "nccl" else ""),
                                 capture_output=True, text=True, timeout=150)
        out, _ = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    assert trainer.returncode == 0 and trainer.stdout.count("TRAINER_DONE") == 2, \
        trainer.stdout + trainer.stderr[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert line and float(line.split()[1]) == sum(range(1024)), out[-3000:]
