"""The throughput benchmark's CPU smoke run, and the train package importing without optional deps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_tiny(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/train_throughput.py"), "--tiny", "--steps", "1",
                           "--warmup", "1", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["impl"]) for r in rows] == [
        ("qwen2.5-0.5b-tiny", "areal_fsdp"), ("qwen2.5-0.5b-tiny", "hf_plain"),
        ("qwen2.5-1.5b-tiny", "areal_fsdp"), ("qwen2.5-1.5b-tiny", "hf_plain")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 <= r["mfu"] < 1 and "error" not in r


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('datasets', 'simple_parsing', 'submitit'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import areal_hpc.train.attention, areal_hpc.train.batch, areal_hpc.train.checkpoint, areal_hpc.train.dist
import areal_hpc.train.engine, areal_hpc.train.logprob, areal_hpc.train.optim, areal_hpc.train.packing
import areal_hpc.train.parallel, areal_hpc.train.ppo, areal_hpc.train.publish, areal_hpc.train.sft
import areal_hpc.train.weight_sync, areal_hpc.train.testing
print('ok')
"""


def test_train_imports_without_datasets_simple_parsing_submitit():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
