"""The train package importing without optional deps, and the phases tool (the throughput benchmark's CPU
smoke run is in test_bench_smoke.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('datasets', 'simple_parsing', 'submitit'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import areal_hpc.train.packed_attention, areal_hpc.train.batching, areal_hpc.train.checkpoint, areal_hpc.train.dist
import areal_hpc.train.engine, areal_hpc.train.logprob
import areal_hpc.train.parallel, areal_hpc.train.ppo_loss, areal_hpc.train.publish, areal_hpc.train.sft_loss
import areal_hpc.train.weight_sync
print('ok')
"""


def test_train_imports_without_datasets_simple_parsing_submitit():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_phases_tool_prints_mean_and_p90_per_phase(tmp_path):
    rows = [{"step": i + 1, "time_s": 0.5 * (i + 1), "step_time_s": 0.5, "phase/train": 0.1 * (i + 1),
             "phase/wait_rollout": 0.05, "phase/other": 0.45 - 0.1 * (i + 1)} for i in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tool = str(ROOT / "tools/bench/phases.py")
    out = subprocess.run([sys.executable, tool, str(tmp_path), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert list(s) == ["wait_rollout", "train", "other", "step"]  # pipeline order, the step last
    assert abs(s["train"]["mean_s"] - 0.25) < 1e-9 and abs(s["train"]["p90_s"] - 0.37) < 1e-9
    assert abs(s["step"]["share"] - 1.0) < 1e-9 and s["step"]["n_steps"] == 4
    assert abs(sum(v["share"] for k, v in s.items() if k != "step") - 1.0) < 1e-9
    skip = json.loads(subprocess.run([sys.executable, tool, str(tmp_path), "--json", "--skip", "2"],
                                     capture_output=True, text=True, cwd=ROOT).stdout)
    assert skip["step"]["n_steps"] == 2 and abs(skip["train"]["mean_s"] - 0.35) < 1e-9
    # metrics from before the phases: the coarser split, the step's wall time from time_s
    legacy = [{"step": i + 1, "time_s": 0.6 * (i + 1), "step_time_s": 0.5, "gen_wait_s": 0.1, "train_s": 0.3,
               "publish_s": 0.02, "weight_update_s": 0.03} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    s = json.loads(subprocess.run([sys.executable, tool, str(tmp_path / "metrics.jsonl"), "--json"],
                                  capture_output=True, text=True, cwd=ROOT).stdout)
    assert abs(s["step"]["mean_s"] - (0.5 + 0.6 + 0.6) / 3) < 1e-9 and abs(s["weight_load"]["mean_s"] - 0.03) < 1e-9
    missing = subprocess.run([sys.executable, tool, str(tmp_path / "nope")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no metrics" in missing.stderr
