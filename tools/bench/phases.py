"""Where a run's steps spent their time: mean and p90 of every phase in `{run}/metrics.jsonl`.

Each step's metrics split its wall time (``step_time_s``) into ``phase/*`` entries (see
`areal_hpc/train/phases.py`); this prints them per phase, with the share of the mean step, then
the phases of the background weight update (``bg_phase/*``: it overlaps the next step) with
their share of the mean step too:

    python tools/bench/phases.py runs/$USER/quickstart/run0 [--skip 5] [--markdown] [--json]

Metrics written before the phases existed (``gen_wait_s``, ``train_s``, ``publish_s``,
``weight_update_s``) are read as the coarser split they allow: training includes the logprob
recomputation, the weight load includes pausing the servers, and the wall time of a step is
the gap between consecutive ``time_s`` (so ``other`` holds metrics and checkpoints too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

import common  # noqa: F401  (the repository on sys.path)
from areal_hpc.train.phases import BG_PREFIX, PREFIX
from areal_hpc.trainers.metrics import read_metrics

# the order phases are printed in (others follow, alphabetically)
ORDER = ("wait_rollout", "data", "logprob", "train", "weight_wait", "weight_publish", "weight_pause", "weight_load",
         "weight_broadcast", "metrics", "checkpoint", "other")


def legacy_phases(rows: List[dict]) -> List[Dict[str, float]]:
    """Phases of metrics written before ``phase/*`` existed."""
    out, prev_t = [], None
    for r in rows:
        wall = r["time_s"] - prev_t if prev_t is not None else r.get("step_time_s", 0.0)
        prev_t = r["time_s"]
        p = {"wait_rollout": r.get("gen_wait_s", 0.0), "train": r.get("train_s", 0.0),
             "weight_publish": r.get("publish_s", 0.0)}
        bcast = r.get("weight_broadcast_s")
        if bcast is not None:
            p["weight_broadcast"] = bcast
            p["weight_pause"] = r.get("weight_update_s", 0.0) - bcast
        else:
            p["weight_load"] = r.get("weight_update_s", 0.0)
        p["other"] = max(0.0, wall - sum(p.values()))
        p["step"] = wall
        out.append(p)
    return out


def step_phases(rows: List[dict], prefix: str = PREFIX) -> List[Dict[str, float]]:
    if prefix == PREFIX and rows and not any(k.startswith(PREFIX) for k in rows[-1]):
        return legacy_phases(rows)
    return [{**{k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}, "step": r["step_time_s"]}
            for r in rows]


def percentile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(rows: List[dict], skip: int = 0, prefix: str = PREFIX) -> Dict[str, Dict[str, float]]:
    steps = step_phases(rows, prefix)[skip:]
    if not steps:
        raise SystemExit("no steps to summarize")
    names = [n for n in ORDER if any(n in s for s in steps)]
    names += sorted({n for s in steps for n in s} - set(names) - {"step"}) + ["step"]
    mean_step = sum(s["step"] for s in steps) / len(steps)
    out = {}
    for n in names:
        xs = [s.get(n, 0.0) for s in steps]
        mean = sum(xs) / len(xs)
        out[n] = {"mean_s": mean, "p90_s": percentile(xs, 0.9), "share": mean / mean_step if mean_step else 0.0}
    out["step"]["n_steps"] = len(steps)
    return out


def render(summary: Dict[str, Dict[str, float]], markdown: bool) -> str:
    lines = []
    if markdown:
        lines += ["| phase | mean s | p90 s | share of step |", "| --- | --- | --- | --- |"]
        for n, v in summary.items():
            lines.append(f"| {n} | {v['mean_s']:.4f} | {v['p90_s']:.4f} | {100 * v['share']:.1f}% |")
    else:
        lines.append(f"{'phase':<18}{'mean s':>10}{'p90 s':>10}{'share':>8}")
        for n, v in summary.items():
            lines.append(f"{n:<18}{v['mean_s']:>10.4f}{v['p90_s']:>10.4f}{100 * v['share']:>7.1f}%")
    lines.append(f"({summary['step']['n_steps']} steps)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory, or its metrics.jsonl")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N steps (warm-up)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        print(f"phases.py: error: no metrics at {path}", file=sys.stderr)
        return 2
    rows = read_metrics(path)
    summary = summarize(rows, args.skip)
    background = summarize(rows, args.skip, BG_PREFIX) if any(k.startswith(BG_PREFIX) for r in rows for k in r) else {}
    if args.json:
        print(json.dumps({**summary, **{"bg/" + k: v for k, v in background.items() if k != "step"}}))
        return 0
    print(render(summary, args.markdown))
    if background:
        background.pop("step")
        print("\nbackground weight update (beside the next step; share of the mean step):")
        print(render({**background, "step": summary["step"]}, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
