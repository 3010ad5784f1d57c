"""Whole-loop GRPO on one node: async (staleness 2) vs sync, same workload, same call (GPU or CPU).

Builds a Qwen2.5-0.5B-architecture model (random init, bf16 on GPU; a local char tokenizer padded
to the real vocabulary) and a generated task, then runs `areal-hpc submit` in mode=local with
servers on their own GPUs and FSDP2 trainer ranks on the rest, twice: async and sync. Reports
steps/s, generated and trained tokens/s, weight-sync time per step, and GPU utilisation sampled
with nvidia-smi (servers' GPUs vs trainer's GPUs). Also runs the toy quickstart task on GPU.

    python tools/bench/gpu_loop.py --gpus 2 --steps 12 --out /tmp/bench     # 1 server GPU + 1 trainer GPU
    python tools/bench/gpu_loop.py --gpus 4 --servers 2 --steps 12          # 2 + 2
    python tools/bench/gpu_loop.py --gpus 0 --model toy:qwen3-h128-l2 --weight-update disk --skip-toy \
        --batch 8 --samples 8 --new-tokens 256 --steps 14 --set cluster.cpus_per_task_cpu=1
        # CPU: 1 server + 1 trainer process, one core each
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
WEIGHT_PHASES = ("phase/weight_publish", "phase/weight_pause", "phase/weight_load", "phase/weight_broadcast")


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc import toy

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = toy.build_tokenizer(out, vocab_size=151936)
    cfg = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(out))
    return out


class GpuSampler:
    """nvidia-smi utilisation per GPU, sampled every 0.5 s while a run lasts."""

    def __init__(self):
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append([float(x) for x in out])

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def mean(self, gpus):
        if not self.samples:
            return None
        return sum(sum(s[g] for g in gpus) / len(gpus) for s in self.samples) / len(self.samples)


def run(name: str, args, overrides: list[str]) -> dict:
    from areal_hpc.trainers.metrics import read_metrics

    root = Path(args.out)
    cmd = [sys.executable, "-m", "areal_hpc", "submit", str(REPO / "configs" / "quickstart.yaml"),
           f"cluster.fileroot={root}", f"cluster.n_gpus_per_node={args.gpus}", "stats.progress_bar=False",
           f"experiment_name=bench", f"trial_name={name}", "saver.freq_steps=0", *overrides]
    t0 = time.monotonic()
    with GpuSampler() as smi:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = p.communicate(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:  # a graceful stop (SIGTERM = `areal-hpc stop`), then show why
            p.terminate()
            _, stderr = p.communicate(timeout=90)
            stderr = f"(stopped after {args.run_timeout} s)\n{stderr}"
    wall = time.monotonic() - t0
    rd = next(root.glob(f"*/bench/{name}"))
    if os.environ.get("OUT"):  # the device tool brings $OUT back: keep every log of the run
        shutil.copytree(rd / "logs", Path(os.environ["OUT"]) / "loop-logs" / name, dirs_exist_ok=True)
    rows = read_metrics(rd / "metrics.jsonl")
    if p.returncode != 0 or not rows:
        logs = "".join(f"\n--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted((rd / "logs").glob("*")))
        print(f"{name} failed (exit {p.returncode}, {len(rows)} steps):\n{stderr[-3000:]}{logs}", flush=True)
        return {"run": name, "failed": True}
    warm = rows[args.warmup:] or rows
    span = warm[-1]["time_s"] - (rows[args.warmup - 1]["time_s"] if args.warmup and len(rows) > args.warmup else 0)
    plan = json.loads((rd / "plan.json").read_text())
    server_gpus = sorted({g for s in plan["steps"] if s["role"] == "server" for g in s["gpu_ids"]})
    trainer_gpus = sorted({g for s in plan["steps"] if s["role"] == "trainer" for g in s["gpu_ids"]})
    res = {
        "run": name, "steps": len(rows), "wall_s": round(wall, 1),
        "steps_per_s": len(warm) / span if span > 0 else None,
        "gen_tokens_per_s": sum(r["gen_tokens"] for r in warm) / span,
        "trained_tokens_per_s": sum(r["tokens"] for r in warm) / span,
        # every phase of the step (`train.phases`), mean seconds per step: phase/wait_rollout, phase/train, ...
        **{k: sum(r.get(k, 0.0) for r in warm) / len(warm) for k in sorted({k for r in warm for k in r})
           if k.startswith("phase/")},
        "weight_update_s": sum(r.get(k, 0.0) for r in warm for k in WEIGHT_PHASES) / len(warm),
        "step_time_s": sum(r["step_time_s"] for r in warm) / len(warm),
        "staleness_max": max(r["staleness_max"] for r in rows),
        "reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"],
        "util_server_gpus": smi.mean(server_gpus) if server_gpus else None,
        "util_trainer_gpus": smi.mean(trainer_gpus) if trainer_gpus else None,
        "server_gpus": server_gpus, "trainer_gpus": trainer_gpus,
    }
    print(json.dumps(res), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--servers", type=int, default=0, help="server GPUs (default: half)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--weight-update", default="nccl", choices=["nccl", "disk"])
    ap.add_argument("--model", default="qwen2.5-0.5b", help="qwen2.5-0.5b (built here) or any model path/toy spec")
    ap.add_argument("--staleness", type=int, default=2)
    ap.add_argument("--ac", default="on", choices=["on", "off"], help="activation checkpointing in the trainer")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument("--out", default="/tmp/areal-bench")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is stopped and its logs shown")
    ap.add_argument("--only", default="", help="comma list of runs: async,sync,toy")
    args = ap.parse_args()
    servers = args.servers or max(1, args.gpus // 2)
    trainers = max(1, args.gpus - servers)
    only = set(filter(None, args.only.split(","))) or {"async", "sync", "toy"}
    model = args.model
    if model == "qwen2.5-0.5b" and only & {"async", "sync"}:
        model = build_model(Path(args.out) / "qwen2.5-0.5b-arch")
    common = [f"allocation_mode=hf:d{servers}+fsdp:d{trainers}", f"trainer.ppo.actor.path={model}",
              f"trainer.total_train_steps={args.steps}", f"rollout.batch_size={args.batch}",
              f"rollout.n_samples={args.samples}", f"rollout.gen.max_new_tokens={args.new_tokens}",
              "rollout.reward_fn=exact_match", f"trainer.ppo.actor.attn_impl={'varlen' if args.gpus else 'sdpa'}",
              "trainer.ppo.actor.optimizer.lr=1e-6", "trainer.ppo.mb_spec.max_tokens_per_mb=8192", f"trainer.ppo.actor.gradient_checkpointing={args.ac == 'on'}",
              f"trainer.ppo.weight_update={args.weight_update}", "train_dataset.path=toy:sum-4096", *args.set]
    results = {}
    if "async" in only:
        results["async"] = run("async", args, common + [f"rollout.max_head_offpolicyness={args.staleness}"])
    if "sync" in only:
        results["sync"] = run("sync", args, common + ["trainer.ppo.async_training=False"])
    if not results.get("async", {}).get("failed", True) and not results.get("sync", {}).get("failed", True):
        a, s = results["async"], results["sync"]
        # Ideal overlap from the sync run's own timings: generation and training fully overlapped.
        t_gen = s["phase/wait_rollout"]
        t_train = s["step_time_s"] - t_gen
        bound = (t_gen + t_train) / max(t_gen, t_train)
        ratio = a["steps_per_s"] / s["steps_per_s"]
        # the async step beyond max(generation, training): generation is the sync run's wait, training
        # the async run's own train (+ logprob) phases
        a_train = a.get("phase/train", 0.0) + a.get("phase/logprob", 0.0)
        beyond = a["step_time_s"] - max(t_gen, a_train)
        print(json.dumps({"async_over_sync_steps_per_s": ratio, "sync_t_gen_s": t_gen, "sync_t_train_s": t_train,
                          "ideal_bound": bound, "fraction_of_bound": ratio / bound,
                          "async_train_over_sync_train": a_train / max(1e-9, s.get("phase/train", 0.0)
                                                                        + s.get("phase/logprob", 0.0)),
                          "async_beyond_max_gen_train_share": beyond / a["step_time_s"]}), flush=True)
    if "toy" in only and not args.skip_toy:
        results["toy"] = run("toy", args, [f"allocation_mode=hf:d1+fsdp:d1", "trainer.total_train_steps=150",
                                           f"trainer.ppo.weight_update={args.weight_update}"])


if __name__ == "__main__":
    main()
