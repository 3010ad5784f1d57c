"""`trainer.type=null`: the workflow over `valid_dataset` once through the servers, and a report (eval.json,
eval_samples.jsonl); no trainer GPUs, no weights change."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from areal_hpc.config import prompt_tokenizer_path
from areal_hpc.rollout import Group, RolloutError
from areal_hpc.trainers.base import STOPPED_EXIT, Trainer
from areal_hpc.trainers.factory import register_trainer

log = logging.getLogger("areal_hpc.trainer")


@register_trainer("null")
class EvalTrainer(Trainer):
    def run(self) -> int:
        from areal_hpc.trainers.rollout_side import load_prompts, load_tokenizer, make_rollout_workflow, server_pool

        cfg, ctx, ds = self.cfg, self.ctx, self.cfg.valid_dataset
        tokenizer = load_tokenizer(prompt_tokenizer_path(cfg))
        rows = list(load_prompts(ctx, "valid", epochs=1, tokenizer=tokenizer))
        workflow = make_rollout_workflow(cfg, tokenizer, ds)
        pool = server_pool(ctx, should_stop=lambda: bool(self.stop))  # a stop request (SIGTERM) only sets self.stop
        if pool is None:  # it came while waiting for the servers
            return STOPPED_EXIT
        self.publish_state(step=0, version=None, world_size=1, state="evaluating", n_rows=len(rows))
        t0 = time.monotonic()
        try:
            results = asyncio.run(self._evaluate(workflow, rows, pool))
        finally:
            self.close_state()
        if results is None:
            log.warning("evaluation stopped on request: no report")
            return STOPPED_EXIT  # not 0: a run stopped from outside the launcher would read "completed"
        failed = [r for r in results if isinstance(r, BaseException)]  # counted and left out, as training does
        done = [(g, row) for g, row in zip(results, rows) if isinstance(g, Group)]  # None: the workflow skipped it
        if failed:
            log.warning("eval: %d of %d episodes failed; first: %r", len(failed), len(rows), failed[0])
            if not done:  # (a report of 0 prompts, exit 0, would read as completed)
                skipped = len(rows) - len(failed)
                raise RolloutError(f"all {len(failed)} evaluation episodes failed"
                                   + (f" ({skipped} row(s) skipped)" if skipped else "")
                                   + f"; first: {failed[0]!r}") from failed[0]
        trajs = [t for g, _ in done for t in g.trajectories]
        per_prompt = [max((t.reward for t in g.trajectories), default=0.0) for g, _ in done]  # empty: none passed
        n, k = max(1, len(trajs)), cfg.rollout.n_samples
        report = {"dataset": ds.path, "n_prompts": len(done), "n_failed": len(failed), "n_samples": k,
                  "reward_mean": sum(t.reward for t in trajs) / n, "accuracy": sum(t.reward >= 1.0 for t in trajs) / n,
                  f"pass@{k}": sum(r >= 1.0 for r in per_prompt) / max(1, len(per_prompt)),
                  "completion_len_mean": sum(len(t.output_ids) for t in trajs) / n,
                  "weight_versions": sorted({v for t in trajs for v in t.versions}), "time_s": time.monotonic() - t0}
        (ctx.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        with open(ctx.run_dir / "eval_samples.jsonl", "w") as f:
            for g, row in done:
                prompt = row.get(ds.prompt_key)
                if prompt is None:  # a messages row
                    prompt = row.get(ds.messages_key)
                for t in g.trajectories:
                    f.write(json.dumps({"prompt": prompt, "answer": row.get(ds.answer_key),
                                        "completion": t.info.get("completion"), "reward": t.reward}) + "\n")
        log.info("eval: %s", json.dumps(report))
        print(json.dumps(report), flush=True)
        return 0

    async def _evaluate(self, workflow, rows, pool):
        """Each row's group, None (skipped) or exception (in row order); None if a stop is requested first."""
        await pool.start()
        sem = asyncio.Semaphore(max(1, self.cfg.rollout.max_concurrent_rollouts or 64))

        async def one(row):
            async with sem:
                return await workflow.arun_episode(pool, row)

        episodes = asyncio.gather(*(one(r) for r in rows), return_exceptions=True)
        try:
            while not self.stop:
                if (await asyncio.wait([episodes], timeout=0.2))[0]:
                    return episodes.result()
            episodes.cancel()
            return None
        finally:
            await pool.close()
            if hasattr(workflow, "close"):  # its reward workers
                workflow.close()
