#!/usr/bin/env python
"""The whole loop: async vs sync on one node, and the README quickstart beside TRL's GRPOTrainer.

``async-sync``: GRPO through `areal-hpc submit` in mode=local, twice, async (staleness 2) and sync,
same workload, same call: servers on their own GPUs and FSDP2 trainer ranks on the rest (a
Qwen2.5-0.5B-architecture model, random init, bf16, a local char tokenizer padded to the real
vocabulary, a generated task), or on CPU with a toy model. Reports steps/s, generated and trained
tokens/s, every step phase (`phase/*`), weight-update time per step, GPU utilisation sampled with
nvidia-smi, and the overlap figures (async/sync against the ideal bound from the sync run's own
generate and train times; the async step beyond max(generation, training)). Also runs the toy
quickstart task on GPU.

``trl``: the quickstart beside Hugging Face TRL's GRPOTrainer, same workload, interleaved A/B runs.
TRL is a bench dependency only (`pip install -e ".[bench]"`). Both sides read their settings from
the quickstart config (plus ``--set`` overrides): the model directory the quickstart builds
(`toy:` spec, same weights and tokenizer), the same `toy:sum` rows, prompts per step, samples per
prompt, new tokens, temperature, learning rate and AdamW settings, gradient clip, PPO clip,
exact-match reward, group-normalised advantages, no KL, steps. Runs alternate (TRL, quickstart,
TRL, ...); each is a fresh process tree timed from its launch, its steps' rewards read as they
are written. Per run and as medians: wall seconds to a 10-step mean reward of 0.8 and 0.9,
steps/s, peak RSS of the whole process tree, final 10-step mean. `SETTINGS_THAT_DIFFER` lists
what is not the same on the two sides.

    python tools/bench/loop.py async-sync --gpus 2 --steps 10          # 1 server GPU + 1 trainer GPU
    python tools/bench/loop.py async-sync --gpus 4 --servers 2 --steps 10 --skip-toy --ac off
    python tools/bench/loop.py async-sync --gpus 0 --model toy:qwen3-h128-l2 --weight-update disk --skip-toy \
        --batch 8 --samples 8 --new-tokens 256 --steps 14 --set cluster.cpus_per_task_cpu=1    # CPU
    python tools/bench/loop.py trl --runs 3 --markdown
    python tools/bench/loop.py async-sync --smoke; python tools/bench/loop.py trl --smoke       # CI

`tools/bench/phases.py RUN_DIR` prints the per-phase breakdown of any run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import QUICKSTART, QWEN25_SHAPES, QWEN25_VOCAB, REPO, median

WEIGHT_PHASES = ("phase/weight_publish", "phase/weight_pause", "phase/weight_load", "phase/weight_broadcast")


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc import toy

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = toy.build_tokenizer(out, vocab_size=QWEN25_VOCAB)
    cfg = AutoConfig.for_model("qwen2", vocab_size=QWEN25_VOCAB, **QWEN25_SHAPES["qwen2.5-0.5b"],
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


def loop_run(name: str, args, overrides: list[str]) -> dict:
    from areal_hpc.trainers.metrics import read_metrics

    root = Path(args.out)
    cmd = [sys.executable, "-m", "areal_hpc", "submit", str(QUICKSTART),
           f"cluster.fileroot={root}", f"cluster.n_gpus_per_node={args.gpus}", "stats.progress_bar=False",
           "experiment_name=bench", f"trial_name={name}", "saver.freq_steps=0", *overrides]
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


SMOKE_ASYNC_SYNC = ["--gpus", "0", "--model", "toy:qwen3-h128-l2", "--weight-update", "disk", "--skip-toy",
                    "--batch", "4", "--samples", "4", "--new-tokens", "8", "--steps", "4", "--warmup", "1",
                    "--set", "cluster.cpus_per_task_cpu=1", "--run-timeout", "120"]


def round2(x: Optional[float]) -> Optional[float]:
    return round(x, 2) if x is not None else None


def cmd_async_sync(args) -> int:
    servers = args.servers or max(1, args.gpus // 2)
    trainers = max(1, args.gpus - servers)
    only = set(filter(None, args.only.split(","))) or {"async", "sync", "toy"}
    model = args.model
    if model == "qwen2.5-0.5b" and only & {"async", "sync"}:
        model = build_model(Path(args.out) / "qwen2.5-0.5b-arch")
    words = [f"allocation_mode=hf:d{servers}+fsdp:d{trainers}", f"trainer.ppo.actor.path={model}",
             f"trainer.total_train_steps={args.steps}", f"rollout.batch_size={args.batch}",
             f"rollout.n_samples={args.samples}", f"rollout.gen.max_new_tokens={args.new_tokens}",
             "rollout.reward_fn=exact_match", f"trainer.ppo.actor.attn_impl={'varlen' if args.gpus else 'sdpa'}",
             "trainer.ppo.actor.optimizer.lr=1e-6", "trainer.ppo.mb_spec.max_tokens_per_mb=8192",
             f"trainer.ppo.actor.gradient_checkpointing={args.ac == 'on'}",
             f"trainer.ppo.weight_update={args.weight_update}", "train_dataset.path=toy:sum-4096", *args.set]
    results = {}
    if "async" in only:
        results["async"] = loop_run("async", args, words + [f"rollout.max_head_offpolicyness={args.staleness}"])
    if "sync" in only:
        results["sync"] = loop_run("sync", args, words + ["trainer.ppo.async_training=False"])
    if all(k in results and not results[k].get("failed") for k in ("async", "sync")):
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
        results["toy"] = loop_run("toy", args, ["allocation_mode=hf:d1+fsdp:d1", "trainer.total_train_steps=150",
                                                f"trainer.ppo.weight_update={args.weight_update}"])
    return 1 if any(r.get("failed") for r in results.values()) else 0


WINDOW = 10  # steps in the moving mean of the reward
THRESHOLDS = (0.8, 0.9)

SETTINGS_THAT_DIFFER = [
    "processes: the quickstart runs an `hf` inference server and a trainer process (its rollout client in a "
    "forked process of its own, rollout.client_process) that talk over HTTP (one generate request per prompt, "
    "for its samples) and exchange weights after every step; TRL is one process that generates with "
    "`model.generate` and trains the same model object",
    "overlap: the quickstart is asynchronous (rollout.max_head_offpolicyness, 1 in the quickstart: a batch "
    "may come from the previous weights, corrected by the decoupled loss's importance weight); TRL "
    "generates each batch with the current weights, then trains on it",
    "loss: the quickstart's decoupled PPO loss adds a dual clip (trainer.ppo.c_clip) and caps the "
    "behaviour importance weight (behav_imp_weight_cap, 5); TRL's 'dapo' loss is the plain PPO clip with "
    "the same token-mean normalisation over the batch (with one update per batch the ratio is 1 in both)",
    "advantages: both subtract the group mean and divide by the group's (unbiased) std; the quickstart adds "
    "1e-6 to the std, TRL 1e-4; the quickstart gives exactly 0 to groups whose rewards are all equal "
    "(TRL: (r - mean) / (0 + 1e-4) = 0 too)",
    "threads: each quickstart process uses cluster.cpus_per_task_cpu torch threads; TRL uses torch's "
    "default (one per core)",
    "training engine: the quickstart packs the batch into token-budget micro-batches through FSDP2 (one "
    "rank), and runs documents that share a stem once (engine.share_stems: the 8 one-token answers of a "
    "prompt are one forward of the prompt, exactly the same logprobs and gradients); TRL runs padded "
    "batches on the plain model (no FSDP), every row",
    "start-up: the quickstart's wall time includes `areal-hpc submit` (config checks, run directory, "
    "starting two processes, the server registering); TRL's includes importing trl and building the "
    "trainer. Both load the same model directory",
    "data order: both shuffle the same rows, with different generators",
    "bookkeeping: the quickstart writes metrics.jsonl, TensorBoard events and a checkpoint every "
    "saver.freq_steps steps; TRL logs every step to memory (report_to none, no checkpoints)",
]


# ---------------------------------------------------------------------------- the TRL side (child process)
def trl_worker(spec: Dict, progress: Path) -> None:
    """One TRL GRPOTrainer run on ``spec``; a line per logged step into ``progress``."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    rows = [json.loads(x) for x in Path(spec["data_file"]).read_text().splitlines() if x.strip()]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])

    def exact_match(prompts, completions, answer, **_):
        return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]

    out = open(progress, "a", buffering=1)

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                out.write(json.dumps({"step": state.global_step, "reward": logs["reward"], "t": time.time()}) + "\n")

    args = GRPOConfig(
        output_dir=spec["out_dir"], max_steps=spec["steps"], seed=spec["seed"],
        per_device_train_batch_size=spec["batch_size"] * spec["n_samples"], num_generations=spec["n_samples"],
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=spec["weight_decay"],
        adam_beta1=spec["beta1"], adam_beta2=spec["beta2"], adam_epsilon=spec["eps"], max_grad_norm=spec["grad_clip"],
        epsilon=spec["eps_clip"], beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Progress()])
    print(json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)
    trainer.train()
    out.close()


# ---------------------------------------------------------------------------- the parent
def workload(overrides: List[str]) -> Dict:
    """The quickstart's settings (with ``overrides``), as both sides use them."""
    from areal_hpc import toy
    from areal_hpc.config import load_config

    cfg = load_config(str(QUICKSTART), list(overrides))
    ppo, opt, r = cfg.trainer.ppo, cfg.trainer.ppo.actor.optimizer, cfg.rollout
    if ppo.kl_ctl or ppo.adv_norm != "group" or not ppo.adv_std_norm or ppo.leave_one_out or ppo.ppo_n_minibatches != 1:
        raise SystemExit("loop.py trl compares GRPO as the quickstart runs it: group-normalised advantages with std, "
                         "no KL, one minibatch")
    if opt.lr_schedule != "constant" or opt.warmup_steps or r.reward_fn != "exact_match":
        raise SystemExit("loop.py trl needs a constant lr without warm-up and the exact_match reward")
    return {"model_dir": toy.resolve_model(ppo.actor.path), "data_file": toy.resolve_dataset(cfg.train_dataset.path),
            "batch_size": r.batch_size, "n_samples": r.n_samples, "max_new_tokens": r.gen.max_new_tokens,
            "temperature": r.gen.temperature or 1.0, "lr": opt.lr, "weight_decay": opt.weight_decay,
            "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps, "grad_clip": opt.grad_clip,
            "eps_clip": ppo.eps_clip, "steps": cfg.trainer.total_train_steps, "seed": cfg.seed,
            "threads_per_process": cfg.cluster.cpus_per_task_cpu, "staleness": r.max_head_offpolicyness,
            "async": ppo.async_training, "weight_update": ppo.weight_update}


class TreeRSS:
    """Peak summed RSS of a process and its descendants, sampled every 0.25 s (Linux /proc)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _tree_rss(root: int) -> int:
        parents, rss = {}, {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                parents[int(d.name)] = int(fields[1])  # ppid
                rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
            except (OSError, ValueError, IndexError):
                continue
        tree, frontier = {root}, [root]
        while frontier:
            kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
            tree.update(kids)
            frontier = kids
        return sum(rss.get(p, 0) for p in tree)

    def _run(self):
        while not self._stop.wait(0.25):
            if not Path(f"/proc/{self.pid}").exists():
                return
            self.peak = max(self.peak, self._tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def follow(cmd: List[str], progress: Path, parse, timeout_s: float, env=None, log: Optional[Path] = None) -> Dict:
    """Run ``cmd``; read ``progress`` as it grows (``parse(line) -> (step, reward) or None``)."""
    progress.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    logf = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    rss = TreeRSS(p.pid)
    steps, pos, buf = [], 0, ""
    while True:
        done = p.poll() is not None
        if progress.exists():
            with open(progress) as f:
                f.seek(pos)
                buf += f.read()
                pos = f.tell()
            *lines, buf = buf.split("\n")
            now = time.time()
            for line in lines:
                got = parse(line)
                if got is not None:
                    steps.append((got[0], got[1], now - t0))
        if done:
            break
        if time.time() - t0 > timeout_s:
            p.terminate()
            p.wait(60)
            break
        time.sleep(0.1)
    wall = time.time() - t0
    peak = rss.stop()
    return {"rc": p.returncode, "wall_s": wall, "peak_rss_mb": peak / 2**20, "steps": steps}


def summarize(name: str, res: Dict) -> Dict:
    steps = res["steps"]
    rewards = [r for _, r, _ in steps]
    out = {"run": name, "rc": res["rc"], "steps": len(steps), "wall_s": round(res["wall_s"], 1),
           "peak_rss_mb": round(res["peak_rss_mb"]), "first_step_s": round(steps[0][2], 1) if steps else None}
    for th in THRESHOLDS:
        out[f"t_{th}"] = None
        for i in range(WINDOW, len(steps) + 1):
            if sum(rewards[i - WINDOW:i]) / WINDOW >= th:
                out[f"t_{th}"], out[f"step_{th}"] = round(steps[i - 1][2], 1), steps[i - 1][0]
                break
    out["steps_per_s"] = round((len(steps) - 1) / (steps[-1][2] - steps[0][2]), 2) if len(steps) > 1 else None
    out["final_reward"] = round(sum(rewards[-WINDOW:]) / min(WINDOW, len(rewards)), 3) if rewards else None
    return out


def run_trl(i: int, spec: Dict, root: Path, timeout_s: float) -> Dict:
    d = root / f"trl{i}"
    spec = dict(spec, out_dir=str(d / "out"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec.json").write_text(json.dumps(spec))
    progress = d / "progress.jsonl"
    progress.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "trl", "--worker", str(d / "spec.json"), str(progress)]

    def parse(line):
        if not line.strip():
            return None
        r = json.loads(line)
        return r["step"], r["reward"]
    return summarize(f"trl{i}", follow(cmd, progress, parse, timeout_s, log=d / "log.txt"))


def run_quickstart(i: int, overrides: List[str], root: Path, timeout_s: float, tree: Optional[Path] = None,
                   side: str = "areal") -> Dict:
    """The quickstart from this checkout, or from another source ``tree`` (e.g. an earlier commit,
    `git archive REV areal_hpc configs | tar -x -C DIR`), with that tree's quickstart config."""
    name = f"{side}{i}"
    rd_root = root / "runs"
    config = (tree / "configs" / "quickstart.yaml") if tree else QUICKSTART
    cmd = [sys.executable, "-m", "areal_hpc", "submit", str(config), f"cluster.fileroot={rd_root}",
           "experiment_name=trl-bench", f"trial_name={name}", "stats.progress_bar=False", *overrides]
    env = None
    if tree:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    import getpass

    progress = rd_root / getpass.getuser() / "trl-bench" / name / "metrics.jsonl"
    shutil.rmtree(progress.parent, ignore_errors=True)  # a fresh run, not a resumed one

    def parse(line):
        if not line.strip():
            return None
        r = json.loads(line)
        return r["step"], r["reward_mean"]
    res = summarize(name, follow(cmd, progress, parse, timeout_s, env=env, log=root / f"{name}.log"))
    res["run_dir"] = str(progress.parent)
    return res


def cmd_trl(args) -> int:
    overrides = list(args.set) + ([f"trainer.total_train_steps={args.steps}"] if args.steps else [])
    spec = workload(overrides)
    only = set(args.only.split(",")) | ({"before"} if args.before else set())
    if "trl" in only:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("loop.py trl: error: TRL is not installed (pip install -e '.[bench]')", file=sys.stderr)
            return 2
    root = Path(args.out or tempfile.mkdtemp(prefix="areal-trl-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"workload": spec, "overrides": overrides, "out": str(root)}), flush=True)
    sides = ("trl", "areal", "before")
    results: Dict[str, List[Dict]] = {side: [] for side in sides}
    unseeded = [o for o in overrides if not o.startswith("seed=")]  # `--set seed=S`: run i uses S + i
    for i in range(args.runs):
        seed = spec["seed"] + (0 if args.same_seed else i)  # run i of every side: the same seed
        for side in sides:
            if side not in only:
                continue
            if side == "trl":
                res = run_trl(i, dict(spec, seed=seed), root, args.timeout)
            else:
                res = run_quickstart(i, [*unseeded, f"seed={seed}"], root, args.timeout,
                                     Path(args.before) if side == "before" else None, side)
            res["seed"] = seed
            results[side].append(res)
            print(json.dumps(res), flush=True)
    keys = ["t_0.8", "t_0.9", "steps_per_s", "peak_rss_mb", "final_reward", "first_step_s", "wall_s"]
    med = {side: {k: round2(median([r.get(k) for r in rs])) for k in keys} for side, rs in results.items() if rs}
    for side, rs in results.items():
        if rs:
            med[side]["reached_0.9"] = f"{sum(r.get('t_0.9') is not None for r in rs)}/{len(rs)}"
    print(json.dumps({"median": med}), flush=True)
    if args.markdown:
        print("\n| run | seed | s to 0.8 | s to 0.9 (step) | steps/s | peak RSS MB | final 10-step reward | "
              "first step s | wall s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for side in sides:
            for r in results[side]:
                print(f"| {r['run']} | {r['seed']} | {r['t_0.8']} | {r['t_0.9']} ({r.get('step_0.9')}) | "
                      f"{r['steps_per_s']} | "
                      f"{r['peak_rss_mb']} | {r['final_reward']} | {r['first_step_s']} | {r['wall_s']} |")
            if side in med:
                m = med[side]
                print(f"| **{side} median** | | {m['t_0.8']} | {m['t_0.9']} ({m['reached_0.9']} reached) | "
                      f"{m['steps_per_s']} | {m['peak_rss_mb']} | {m['final_reward']} | {m['first_step_s']} | "
                      f"{m['wall_s']} |")
        print("\nSettings that differ:\n" + "\n".join(f"- {s}" for s in SETTINGS_THAT_DIFFER))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = s_async = sub.add_parser("async-sync", help="async vs sync through areal-hpc submit (GPU or CPU)")
    s.add_argument("--gpus", type=int, default=2)
    s.add_argument("--servers", type=int, default=0, help="server GPUs (default: half)")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--new-tokens", type=int, default=512)
    s.add_argument("--batch", type=int, default=16, help="prompts per step")
    s.add_argument("--samples", type=int, default=8)
    s.add_argument("--weight-update", default="nccl", choices=["nccl", "disk"])
    s.add_argument("--model", default="qwen2.5-0.5b", help="qwen2.5-0.5b (built here) or any model path/toy spec")
    s.add_argument("--staleness", type=int, default=2)
    s.add_argument("--ac", default="on", choices=["on", "off"], help="activation checkpointing in the trainer")
    s.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    s.add_argument("--out", default="/tmp/areal-bench")
    s.add_argument("--skip-toy", action="store_true")
    s.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is stopped and its logs shown")
    s.add_argument("--only", default="", help="comma list of runs: async,sync,toy")
    s.add_argument("--smoke", action="store_true", help="CPU, toy model, 4 short steps per run (CI)")
    s = sub.add_parser("trl", help="the quickstart beside TRL's GRPOTrainer, interleaved runs")
    s.add_argument("--runs", type=int, default=3, help="runs of each side (interleaved)")
    s.add_argument("--steps", type=int, default=0, help="steps per run (default: the quickstart's)")
    s.add_argument("--set", nargs="*", default=[], help="key=value overrides of the quickstart (both sides)")
    s.add_argument("--only", default="trl,areal", help="comma list: trl, areal (and before, with --before)")
    s.add_argument("--before", default="", help="also run the quickstart of this source tree (side 'before')")
    s.add_argument("--out", default="", help="work directory (default: a new temporary one)")
    s.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped")
    s.add_argument("--same-seed", action="store_true",
                   help="every run with the config's seed (default: run i uses seed + i on every side, so the "
                        "medians sample the seeds' spread too, not only timing noise)")
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--worker", nargs=2, metavar=("SPEC", "PROGRESS"), help=argparse.SUPPRESS)
    s.add_argument("--smoke", action="store_true",
                   help="one run of each side, 20 steps of 8 prompts (CI); the TRL side is skipped when trl is absent")
    args = ap.parse_args(argv)
    if args.what == "trl" and args.worker:
        trl_worker(json.loads(Path(args.worker[0]).read_text()), Path(args.worker[1]))
        return 0
    if args.what == "async-sync":
        if args.smoke:
            args = s_async.parse_args(SMOKE_ASYNC_SYNC + ["--out", args.out])
        return cmd_async_sync(args)
    if args.smoke:
        args.runs, args.steps, args.set = 1, 20, ["rollout.batch_size=8", *args.set]
        try:
            import trl  # noqa: F401
        except ImportError:
            print(json.dumps({"skipped": "trl", "reason": "TRL is not installed (pip install -e '.[bench]')"}),
                  flush=True)
            args.only = "areal"
    return cmd_trl(args)


if __name__ == "__main__":
    sys.exit(main())
