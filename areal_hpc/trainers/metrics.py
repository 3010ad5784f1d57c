"""Per-step metrics: `{run}/metrics.jsonl`, TensorBoard events, a one-line log summary, a PNG curve."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from areal_hpc.registry.util import atomic_write

log = logging.getLogger("areal_hpc.trainer")

SUMMARY_KEYS = (("reward_mean", "reward {:.3f}"), ("loss", "loss {:+.4f}"), ("staleness_max", "stale<={:.0f}"),
                ("gen_tokens_per_s", "gen {:.0f} tok/s"), ("trained_tokens_per_s", "train {:.0f} tok/s"),
                ("phase/wait_rollout", "wait {:.2f}s"), ("phase/train", "train {:.2f}s"),
                ("step_time_s", "{:.2f}s/step"))


class MetricsWriter:
    """Rank 0 only: one JSON line a step. A run resumed at ``resume_step`` (0: afresh) forgets the steps its
    predecessor wrote past it, lines and TensorBoard events."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, plot: bool = True, resume_step: Optional[int] = None):
        self.path, self.plot_path = run_dir / "metrics.jsonl", run_dir / "reward.png"
        self.plot, self._tb = plot, None
        if resume_step is not None:
            self.drop_after(resume_step)
        if tensorboard:
            try:
                from tensorboard.compat.proto.summary_pb2 import Summary
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1  # (TensorBoard hides those steps' old events)
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=5, purge_step=purge)
                self._summary = Summary
            except ImportError:  # not installed (e.g. a bare GPU image): jsonl still works
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def drop_after(self, step: int) -> None:
        """Forget lines written past ``step`` (and a torn one)."""
        if not self.path.exists():
            return
        keep = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in keep), fsync=True)  # a crash keeps one

    def write(self, metrics: Dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k not in ("step", "version") else v) for k, v in metrics.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:  # one event with every scalar (add_scalar: one a key), flushed by its thread
            values = [self._summary.Value(tag=k, simple_value=v) for k, v in clean.items() if isinstance(v, float)]
            self._tb.file_writer.add_summary(self._summary(value=values), metrics["step"])
        parts = [f"step {metrics['step']} v{metrics.get('version', '?')}"]
        parts += [fmt.format(metrics[k]) for k, fmt in SUMMARY_KEYS if isinstance(metrics.get(k), (int, float))]
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.plot:
            plot_rewards(self.path, self.plot_path)


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """The rows of metrics.jsonl; a line that is not JSON (torn: its trainer was killed writing it) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def plot_rewards(metrics_path: Path, out: Path) -> None:
    """The mean reward by step; nothing for a run without rewards (SFT)."""
    rows = read_metrics(metrics_path)
    if not any(isinstance(r.get("reward_mean"), (int, float)) for r in rows):
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no reward plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r.get("reward_mean") for r in rows], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(f"{metrics_path.parent.parent.name}/{metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
