"""The README quickstart beside Hugging Face TRL's GRPOTrainer, same workload, interleaved A/B runs.

TRL is a bench dependency only (`pip install -e ".[bench]"` or `pip install trl==1.16.0`). Both
sides read their settings from the quickstart config (plus ``--set`` overrides): the model
directory the quickstart builds (`toy:` spec, same weights and tokenizer), the same `toy:sum`
rows, prompts per step, samples per prompt, new tokens, temperature, learning rate and AdamW
settings, gradient clip, PPO clip, exact-match reward, group-normalised advantages, no KL,
steps. Runs alternate (TRL, quickstart, TRL, ...); each is a fresh process tree timed from its
launch, its steps' rewards read as they are written. Per run and as medians: wall seconds to a
10-step mean reward of 0.8 and 0.9, steps/s, peak RSS of the whole process tree, final 10-step
mean. `SETTINGS_THAT_DIFFER` lists what is not the same on the two sides.

    python tools/bench/trl_grpo.py --runs 3 [--steps 300] [--set rollout.batch_size=32 ...] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
QUICKSTART = REPO / "configs" / "quickstart.yaml"
WINDOW = 10  # steps in the moving mean of the reward
THRESHOLDS = (0.8, 0.9)

SETTINGS_THAT_DIFFER = [
    "processes: the quickstart runs an `hf` inference server and a trainer process that talk over HTTP "
    "(one generate request per prompt, for its samples) and exchange weights after every step; TRL is one process that "
    "generates with `model.generate` and trains the same model object",
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
    "rank); TRL runs padded batches on the plain model (no FSDP)",
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
        raise SystemExit("trl_grpo.py compares GRPO as the quickstart runs it: group-normalised advantages with std, "
                         "no KL, one minibatch")
    if opt.lr_schedule != "constant" or opt.warmup_steps or r.reward_fn != "exact_match":
        raise SystemExit("trl_grpo.py needs a constant lr without warm-up and the exact_match reward")
    return {"model_dir": toy.resolve_model(ppo.actor.path), "data_file": toy.resolve_dataset(cfg.train_dataset.path),
            "batch_size": r.batch_size, "n_samples": r.n_samples, "max_new_tokens": r.gen.max_new_tokens,
            "temperature": r.gen.temperature or 1.0, "lr": opt.lr, "weight_decay": opt.weight_decay,
            "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps, "grad_clip": opt.grad_clip,
            "eps_clip": ppo.eps_clip, "steps": cfg.trainer.total_train_steps, "seed": cfg.seed,
            "threads_per_process": cfg.cluster.cpus_per_task_cpu, "staleness": r.max_head_offpolicyness,
            "async": ppo.async_training, "weight_update": ppo.weight_update}


class TreeRSS:
    """Peak summed RSS of a process and its descendants, sampled every 0.25 s."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.wait(0.25):
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(d / "spec.json"), str(progress)]

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


def median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of each side (interleaved)")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: the quickstart's)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of the quickstart (both sides)")
    ap.add_argument("--only", default="trl,areal", help="comma list: trl, areal (and before, with --before)")
    ap.add_argument("--before", default="", help="also run the quickstart of this source tree (side 'before')")
    ap.add_argument("--out", default="", help="work directory (default: a new temporary one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "PROGRESS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        trl_worker(json.loads(Path(args.worker[0]).read_text()), Path(args.worker[1]))
        return 0
    overrides = list(args.set) + ([f"trainer.total_train_steps={args.steps}"] if args.steps else [])
    spec = workload(overrides)
    only = set(args.only.split(",")) | ({"before"} if args.before else set())
    if "trl" in only:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl_grpo.py: error: TRL is not installed (pip install trl==1.16.0)", file=sys.stderr)
            return 2
    root = Path(args.out or tempfile.mkdtemp(prefix="areal-trl-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"workload": spec, "overrides": overrides, "out": str(root)}), flush=True)
    sides = ("trl", "areal", "before")
    results: Dict[str, List[Dict]] = {side: [] for side in sides}
    for i in range(args.runs):
        for side in sides:
            if side not in only:
                continue
            if side == "trl":
                res = run_trl(i, spec, root, args.timeout)
            else:
                res = run_quickstart(i, overrides, root, args.timeout, Path(args.before) if side == "before" else None,
                                     side)
            results[side].append(res)
            print(json.dumps(res), flush=True)
    keys = ["t_0.8", "t_0.9", "steps_per_s", "peak_rss_mb", "final_reward", "first_step_s", "wall_s"]
    med = {side: {k: median([r.get(k) for r in rs]) for k in keys} for side, rs in results.items() if rs}
    for side, rs in results.items():
        if rs:
            med[side]["reached_0.9"] = f"{sum(r.get('t_0.9') is not None for r in rs)}/{len(rs)}"
    print(json.dumps({"median": med}), flush=True)
    if args.markdown:
        print("\n| run | s to 0.8 | s to 0.9 (step) | steps/s | peak RSS MB | final 10-step reward | first step s "
              "| wall s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for side in sides:
            for r in results[side]:
                print(f"| {r['run']} | {r['t_0.8']} | {r['t_0.9']} ({r.get('step_0.9')}) | {r['steps_per_s']} | "
                      f"{r['peak_rss_mb']} | {r['final_reward']} | {r['first_step_s']} | {r['wall_s']} |")
            if side in med:
                m = med[side]
                print(f"| **{side} median** | {m['t_0.8']} | {m['t_0.9']} ({m['reached_0.9']} reached) | "
                      f"{m['steps_per_s']} | {m['peak_rss_mb']} | {m['final_reward']} | {m['first_step_s']} | "
                      f"{m['wall_s']} |")
        print("\nSettings that differ:\n" + "\n".join(f"- {s}" for s in SETTINGS_THAT_DIFFER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
