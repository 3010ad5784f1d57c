"""Decides what runs next: a prefill of waiting sequences, or one decode step of the running ones.

Running sequences are packed: ``running[i].slot == i``, so a decode step is one contiguous batch
of KV-cache rows. When a sequence leaves, the last one moves into its row; the scheduler returns
those moves and the model runner copies the rows.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Iterable, List, Optional, Tuple

from areal_hpc.inference.hf_engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_running: int, max_prefill_tokens: int):
        self.max_running, self.max_prefill_tokens = max(1, int(max_running)), max(1, int(max_prefill_tokens))
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.paused = False

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and not self.paused)

    def schedule(self) -> Optional[Tuple[str, List[Sequence]]]:
        """``("prefill", new)`` while there is room and nothing holds new work, else
        ``("decode", running)``; None when idle."""
        if self.waiting and not self.paused and len(self.running) < self.max_running:
            batch: List[Sequence] = []
            longest = 0
            while self.waiting and len(self.running) + len(batch) < self.max_running:
                seq = self.waiting[0]
                n = max(longest, seq.num_tokens)
                if batch and n * (len(batch) + 1) > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                batch.append(seq)
                longest = n
            for seq in batch:
                seq.slot = len(self.running)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            return "prefill", batch
        if self.running:
            return "decode", self.running
        return None

    def remove(self, seqs: Iterable[Sequence]) -> List[Tuple[int, int, int]]:
        """Take finished sequences out of ``running``; returns row moves ``(src, dst, ncols)``."""
        moves = []
        for seq in sorted(seqs, key=lambda s: s.slot, reverse=True):
            if seq.slot < 0:
                continue
            last = self.running.pop()
            if last is not seq:
                dst = seq.slot
                moves.append((last.slot, dst, last.num_tokens))
                last.slot = dst
                self.running[dst] = last
            seq.slot = -1
        return moves

    def take_waiting(self, rid: Optional[str] = None) -> List[Sequence]:
        """Remove waiting sequences (one rid, or all) and return them."""
        if rid is None:
            out = list(self.waiting)
            self.waiting.clear()
            return out
        out = [s for s in self.waiting if s.rid == rid]
        if out:
            self.waiting = deque(s for s in self.waiting if s.rid != rid)
        return out
