"""Every bench suite of tools/bench/ runs in its --smoke form (CPU, small sizes) and prints its
figures, so the scripts that produced the figures in docs/benchmarks.md cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench"


def run_suite(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{script} exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def json_lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def rows(out: str, bench: str) -> list:
    return [r for r in json_lines(out) if r.get("bench") == bench]


def test_infer_smoke():
    out = run_suite("infer.py", "--smoke")
    engine, generate = rows(out, "hf_engine"), rows(out, "model_generate")
    assert [r["batch"] for r in engine] == [4, 8] and [r["batch"] for r in generate] == [4, 8]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 8 for r in engine + generate)
    (pool,) = rows(out, "pool_trivial_server")
    assert pool["requests"] == 300 and pool["requests_per_s"] > 0


def test_train_smoke(tmp_path):
    out = run_suite("train.py", "--smoke", "--workdir", str(tmp_path))
    got = rows(out, "train_throughput")
    assert [(r["model"], r["impl"]) for r in got] == [
        ("qwen2.5-0.5b-tiny", "areal_fsdp"), ("qwen2.5-0.5b-tiny", "hf_plain"),
        ("qwen2.5-1.5b-tiny", "areal_fsdp"), ("qwen2.5-1.5b-tiny", "hf_plain")]
    for r in got:
        assert r["tokens_per_s"] > 0 and 0 <= r["mfu"] < 1 and "error" not in r
        assert r["mfu"] <= r["mfu_attn"] <= r["mfu_attn_full"]
    assert all(len(r["step_times_s"]) == 1 for r in got if r["impl"] == "areal_fsdp")


def test_attn_smoke():
    out = run_suite("attn.py", "--smoke")
    kernels = rows(out, "attn_kernels")
    assert [(r["kernel"], r["gqa_native"]) for r in kernels] == [("packed", True), ("packed", False)]
    for r in kernels:  # bf16 against the fp32 per-document reference
        assert "error" not in r and r["max_err"] < 0.05 and r["cpu_ms"] > 0
    (overhead,) = rows(out, "attn_overhead")
    assert overhead["call"] == "ours" and 0 < overhead["launch_ms"] <= overhead["total_ms"]


def test_profiler_smoke():
    out = run_suite("profiler.py", "--smoke")
    (train,) = rows(out, "profile_train")
    assert train["tokens"] > 0 and train["tokens_per_s"] > 0 and train["wall_s"] > 0
    (decode,) = rows(out, "profile_decode")
    assert decode["batch"] == 4 and decode["engine_tok_s"] > 0 and decode["forward_ms"] > 0
    assert out.count("Self CPU") >= 2  # the profiler tables of both


def test_registry_smoke(tmp_path):
    out = run_suite("registry.py", "--smoke", "--dir", str(tmp_path))
    writes = rows(out, "writes")
    assert {(r["impl"], r["case"], r["procs"]) for r in writes} == {
        (impl, case, procs) for impl in ("registry", "baseline") for case in ("overwrite", "new") for procs in (1, 2)}
    assert all(r["writes_per_s"] > 0 for r in writes)
    assert {r["lock"] for r in rows(out, "update")} == {"flock", "soft", "raw-flock"}  # no lost update: asserted
    listed = rows(out, "list")
    assert len(listed) == 2 and all(r["records"] == 1000 and r["median_ms"] > 0 for r in listed)
    (watch,) = rows(out, "watch")
    assert watch["seen"] == 1000
    assert "| put registry overwrite, 1 proc |" in out  # the markdown table


def test_loop_async_sync_smoke(tmp_path):
    out = run_suite("loop.py", "async-sync", "--smoke", "--out", str(tmp_path))
    runs = {r["run"]: r for r in json_lines(out) if "run" in r}
    assert set(runs) == {"async", "sync"}
    for r in runs.values():
        assert r["steps"] == 4 and r["steps_per_s"] > 0 and r["phase/train"] > 0 and r["trained_tokens_per_s"] > 0
    (summary,) = [r for r in json_lines(out) if "async_over_sync_steps_per_s" in r]
    assert summary["async_over_sync_steps_per_s"] > 0 and summary["ideal_bound"] >= 1


def test_loop_trl_smoke(tmp_path):
    out = run_suite("loop.py", "trl", "--smoke", "--out", str(tmp_path))
    lines = json_lines(out)
    runs = {r["run"]: r for r in lines if "run" in r}
    assert runs["areal0"]["rc"] == 0 and runs["areal0"]["steps"] == 20 and runs["areal0"]["steps_per_s"] > 0
    (med,) = [r["median"] for r in lines if "median" in r]
    assert med["areal"]["final_reward"] is not None
    if importlib.util.find_spec("trl") is None:
        assert any(r.get("skipped") == "trl" for r in lines)
        pytest.skip("trl is not installed (pip install -e '.[bench]'): the TRL side was not run")
    assert runs["trl0"]["rc"] == 0 and runs["trl0"]["steps"] == 20 and med["trl"]["steps_per_s"] > 0


def launch_result(out: str) -> dict:
    res, _ = json.JSONDecoder().raw_decode(out.lstrip())
    return res


@pytest.mark.slurm
def test_launch_slurm_smoke():
    res = launch_result(run_suite("launch.py", "slurm", "--smoke", "--markdown"))
    med = res["median"]
    assert res["repeat"] == 1 and med["baseline_sbatch_s"] > 0
    assert 0 < med["launch_overhead_s"] < med["submit_to_first_step_s"]
    assert med["submit_to_server_ready_s"] < med["submit_to_first_step_s"]
    assert "overhead_vs_baseline_s" in med and med["model_load_s"] > 0


def test_launch_ray_smoke():
    pytest.importorskip("ray", reason="mode=ray needs ray (pip install -e '.[ray]')")
    res = launch_result(run_suite("launch.py", "ray", "--smoke", "--markdown"))
    med = res["median"]
    assert med["ray_init_s"] > 0 and med["pg_actor_s"] > 0 and med["task_warm_s"] > 0
    assert 0 < med["launch_overhead_s"] <= med["submit_to_first_step_s"]
    assert med["local_launch_overhead_s"] > 0 and "ray_minus_local_s" in med
