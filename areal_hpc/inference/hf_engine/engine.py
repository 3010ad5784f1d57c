"""The engine loop: one thread that admits requests between steps, runs what the `Scheduler` picks, samples, and
finishes sequences.

State changes (pause, abort, a weight swap) are commands run on the loop thread between two steps, so a step never sees
half-updated weights and no lock is held while the model runs. Other threads use only `submit` and `call`; results come
back through each sequence's ``on_finish`` (on the loop thread) and, for commands, a `concurrent.futures.Future`.
Running sequences are packed (``running[i].slot == i``): when one leaves, the last moves into its KV row.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import torch

from areal_hpc.inference.hf_engine.model_runner import ModelRunner
from areal_hpc.inference.hf_engine.sampler import sample
from areal_hpc.inference.hf_engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


class Scheduler:
    def __init__(self, max_running: int, max_prefill_tokens: int):
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []

    def schedule(self) -> Tuple[str, List[Sequence]]:
        """``("prefill", new)`` while there is room, else ``("decode", running)``; call only when either list is
        non-empty."""
        if self.waiting and len(self.running) < self.max_running:
            batch: List[Sequence] = []
            longest = 0
            while self.waiting and len(self.running) + len(batch) < self.max_running:
                longest = max(longest, self.waiting[0].num_tokens)  # prompts are padded to the longest
                if batch and longest * (len(batch) + 1) > self.max_prefill_tokens:
                    break
                batch.append(self.waiting.popleft())
            for seq in batch:
                seq.slot = len(self.running)
                self.running.append(seq)
            return "prefill", batch
        return "decode", self.running

    def remove(self, seqs: Iterable[Sequence]) -> List[Tuple[int, int, int]]:
        """Take finished sequences out of ``running``; returns row moves ``(src, dst, ncols)``."""
        moves = []
        for seq in sorted((s for s in seqs if s.slot >= 0), key=lambda s: s.slot, reverse=True):
            last = self.running.pop()
            if last is not seq:
                moves.append((last.slot, seq.slot, last.num_tokens))
                last.slot = seq.slot
                self.running[seq.slot] = last
            seq.slot = -1
        return moves


class LLMEngine:
    def __init__(self, runner: ModelRunner, *, weight_version: str = "0"):
        self.runner = runner
        self.scheduler = Scheduler(runner.max_running, 16384 if runner.device.type == "cuda" else 8192)
        self.weight_version, self.eos_token_ids = str(weight_version), frozenset(runner.eos_token_ids)
        # no steps while paused, new requests wait in the inbox: "abort" and "retract" empty the batch, "in_place" not
        self.paused = False
        # set (on the loop thread, `tear`): why every request fails with a 503 now; None: serving
        self.refusal: Optional[str] = None
        self._renewed: Dict[str, Tuple[int, ...]] = {}  # shapes by name loaded since the last `tear`
        self._inbox: Deque[Sequence] = deque()
        self._commands: Deque[Tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake, self._stopping = threading.Event(), False
        self._door, self._open = threading.Lock(), False  # open: the loop will take what `_enqueue` appends
        self._thread: Optional[threading.Thread] = None
        self.stats: Dict[str, float] = {"prefill_steps": 0, "decode_steps": 0, "generated_tokens": 0,
                                        "finished_requests": 0, "aborted_requests": 0, "step_errors": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LLMEngine":
        self._open = True
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop, which aborts everything (callers get their partial output)."""
        if self.alive:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout)

    # ------------------------------------------------------------------ thread-safe API
    def _enqueue(self, queue: Deque, item: Any) -> bool:
        """Append ``item`` for the loop and wake it; False once the loop has ended (or never started): a caller that
        checked `alive` first could append just after the loop's last look at its queues, and wait for good."""
        with self._door:
            if not self._open:
                return False
            queue.append(item)
        self._wake.set()
        return True

    def submit(self, seq: Sequence) -> None:
        if seq.params.max_new_tokens == 0:
            seq.finish({"type": "length", "length": 0})
        elif seq.num_tokens >= self.runner.context_length:
            seq.finish({"type": "abort", "status_code": 400,
                        "message": f"input of {seq.num_tokens} tokens does not fit the context length "
                                   f"{self.runner.context_length}"})
        elif not self._enqueue(self._inbox, seq):
            seq.finish({"type": "abort", "status_code": 503, "message": "engine is not running"})

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the loop thread between two steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._enqueue(self._commands, (fn, fut)):
            fut.set_exception(RuntimeError("engine is not running"))
        return fut

    def pause(self, mode: str = "abort") -> concurrent.futures.Future:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, not {mode!r}")
        return self.call(lambda: self._pause(mode))

    def resume(self) -> concurrent.futures.Future:
        return self.call(lambda: setattr(self, "paused", False))

    def abort(self, rid: Optional[str] = None) -> concurrent.futures.Future:
        """Abort by rid (SGLang's rule: `_abort`), or all; running ones return their partial output."""
        return self.call(lambda: self._abort(rid, "aborted by request"))

    def update_weights(self, tensors: List[Tuple[str, torch.Tensor]], version: Optional[str] = None,
                       abort_all: bool = False) -> concurrent.futures.Future:
        def swap() -> Dict[str, Any]:
            n_aborted = self._abort(None, "aborted for a weight update") if abort_all else 0
            try:
                self.runner.load_weights(tensors)
            except Exception as e:
                log.error("%s", self.tear(f"a weight update failed part way: {type(e).__name__}: {e}"))
                raise
            self.renew((name, t.shape) for name, t in tensors)
            self.set_version(version)
            return {"num_tensors": len(tensors), "num_paused_requests": n_aborted,
                    "weight_version": self.weight_version}

        return self.call(swap)

    def tear(self, why: str) -> str:
        """On the loop thread: a weight update failed part way, so no version names the model. Every request gets a 503
        (clients go to other servers) until every tensor has been loaded again (`renew`). Returns the refusal."""
        self.refusal = (f"the model's weights are partly updated ({why}): requests are refused until a complete "
                        "weight update (from disk, or every tensor broadcast again)")
        self._renewed = {}
        return self.refusal

    def renew(self, names_shapes: Iterable[Tuple[str, Tuple[int, ...]]]) -> None:
        """On the loop thread: these tensors were loaded whole; serving again once every one was since `tear`."""
        if self.refusal is not None:
            self._renewed.update(names_shapes)
            if not self.runner.check_weights(self._renewed.items()):
                self.refusal = None

    def set_version(self, version: Optional[Any] = None, abort_all: bool = False) -> None:
        """On the loop thread (`call`): the new weight version (None keeps it, as in SGLang: one update may come in many
        buckets), after aborting every request when ``abort_all``."""
        if abort_all:
            self._abort(None, "aborted for a weight update")
        if version is not None:
            self.weight_version = str(version)

    def snapshot(self) -> Dict[str, Any]:
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting)
                + len(self._inbox), "paused": self.paused, "weight_version": self.weight_version,
                **self.stats}

    def ends(self, params: SamplingParams, tok: int, n_out: int, n_tokens: int) -> Optional[Dict[str, Any]]:
        """Why a sequence whose ``n_out``-th output token (``n_tokens`` with the prompt) is ``tok`` ends, in SGLang's
        order (`Req.update_finish_state`): a stop token (none with ignore_eos), then the length; None: it goes on."""
        if not params.ignore_eos and (tok in self.eos_token_ids or tok in params.stop_token_ids):
            return {"type": "stop", "matched": tok}
        if n_out >= params.max_new_tokens or n_tokens >= self.runner.context_length:  # SGLang cuts the first to fit
            return {"type": "length", "length": n_out}
        return None

    # ------------------------------------------------------------------ commands (loop thread)
    def _retire(self, finished: List[Tuple[Sequence, Dict[str, Any]]]) -> None:
        """Finish running sequences; the last rows of the batch move into the rows they leave."""
        self.runner.move_rows(self.scheduler.remove([s for s, _ in finished]))
        for s, reason in finished:
            s.finish(reason)

    def _fail(self, seqs: List[Sequence], message: str, status_code: Optional[int] = None) -> None:
        reason = {"type": "abort", "message": message, **({"status_code": status_code} if status_code else {})}
        self._retire([(s, dict(reason)) for s in seqs])

    def _abort(self, rid: Optional[str], message: str, status_code: Optional[int] = None) -> int:
        """``rid`` None: every request. A rid, as SGLang: nothing unless a request has it (`TokenizerManager`'s
        `abort_request` drops the abort), then every request whose rid starts with it (`Scheduler.abort_request`)."""
        self._drain_inbox()
        live = (sched := self.scheduler).running + list(sched.waiting)
        if rid is not None and all(s.rid != rid for s in live):
            return 0
        prefix = "" if rid is None else rid
        hit = [s for s in live if s.rid.startswith(prefix)]
        sched.waiting = deque(s for s in sched.waiting if not s.rid.startswith(prefix))
        self._fail(hit, message, status_code)  # a waiting one has no row to leave
        self.stats["aborted_requests"] += len(hit)
        return len(hit)

    def _pause(self, mode: str) -> int:
        self.paused = True  # requests sent from now on wait in the inbox
        if mode == "abort":  # as SGLang's abort_all: every request sent before, running or waiting
            return self._abort(None, "generation paused")
        if mode == "in_place":
            return 0
        running = list(self.scheduler.running)  # retract: back to the queue, re-prefilled with their tokens on continue
        self.scheduler.remove(running)
        self.scheduler.waiting.extendleft(reversed(running))
        return len(running)

    # ------------------------------------------------------------------ the loop
    def _drain_inbox(self) -> None:
        while self._inbox:
            self.scheduler.waiting.append(self._inbox.popleft())

    def _run_commands(self) -> None:
        while self._commands:
            fn, fut = self._commands.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # reported to the caller, the loop goes on
                    fut.set_exception(e)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        try:
            while not self._stopping:
                self._wake.clear()
                self._run_commands()
                if not self.paused:
                    self._drain_inbox()
                if self.refusal is not None and (self.scheduler.running or self.scheduler.waiting):
                    self._abort(None, self.refusal, 503)
                if self.paused or not (self.scheduler.running or self.scheduler.waiting):
                    self._wake.wait(1.0)
                    continue
                self._step()
        except BaseException as e:  # a bug: fail every caller rather than hang them
            log.exception("engine loop died")
            with contextlib.suppress(BaseException):
                self._abort(None, f"engine died: {type(e).__name__}: {e}")
        finally:
            with self._door:  # nothing is queued from now on: what is queued now is all there is to fail
                self._open = False
            with contextlib.suppress(BaseException):  # a stop (after a crash: nothing is left)
                self._abort(None, "server shutting down")
            for _, fut in list(self._commands):
                if not fut.done():
                    fut.set_exception(RuntimeError("engine stopped"))

    def _step(self) -> None:
        kind, seqs = self.scheduler.schedule()
        seqs = list(seqs)
        try:
            logits = (self.runner.prefill if kind == "prefill" else self.runner.decode)(seqs)
            self.stats[f"{kind}_steps"] += 1
            toks, lps = sample(logits, [s.params for s in seqs])
        except Exception as e:
            log.exception("%s step of %d sequences failed", kind, len(seqs))
            self.stats["step_errors"] += 1
            self._fail(seqs, f"engine error: {type(e).__name__}: {e}", 500)
            return
        version = self.weight_version
        finished: List[Tuple[Sequence, Dict[str, Any]]] = []
        for seq, tok, lp in zip(seqs, toks, lps):
            seq.append(tok, lp, version)
            reason = self.ends(seq.params, tok, len(seq.output_ids), seq.num_tokens)
            if reason is not None:
                finished.append((seq, reason))
        self.stats["generated_tokens"] += len(seqs)
        self.stats["finished_requests"] += len(finished)
        if finished:  # a decode step's hot path: most steps finish nothing
            self._retire(finished)
