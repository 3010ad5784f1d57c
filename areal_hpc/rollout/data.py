"""Prompt rows from a local dataset, epoch after epoch, with a resumable position."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional


def load_rows(path: str, limit: int = 0) -> List[Dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet file or directory, through `datasets` (offline).

    Where `datasets` is not installed (bare GPU images) .jsonl files are read directly."""
    p = Path(path)
    files = sorted(str(f) for f in p.iterdir() if f.suffix in (".jsonl", ".json", ".parquet")) if p.is_dir() else [str(p)]
    if not files:
        raise FileNotFoundError(f"no .jsonl/.json/.parquet files in {path}")
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    try:
        from datasets import load_dataset
    except ImportError:
        if not all(f.endswith(".jsonl") for f in files):
            raise
        import json

        rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
        return rows[:limit] if limit else rows
    ds = load_dataset(kind, data_files=files, split="train")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


class PromptLoader:
    """Infinite (or ``epochs``-bounded) iterator over rows, reshuffled each epoch from ``seed``.
    `state_dict`/`load_state_dict` let a recovered trainer continue from the same position."""

    def __init__(self, rows: List[Dict[str, Any]], shuffle: bool = True, seed: int = 1, epochs: int = 0):
        if not rows:
            raise ValueError("the dataset is empty")
        self.rows, self.shuffle, self.seed, self.epochs = rows, shuffle, seed, epochs
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> List[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        if self.pos >= len(self.rows):
            self.epoch += 1
            self.pos = 0
            if self.epochs and self.epoch >= self.epochs:
                raise StopIteration
            self._order = self._make_order()
        row = self.rows[self._order[self.pos]]
        self.pos += 1
        return row

    def state_dict(self, rewind: int = 0) -> Dict[str, int]:
        """Position, moved back by ``rewind`` rows (those in flight, to be generated again)."""
        flat = max(0, self.epoch * len(self.rows) + self.pos - rewind)
        return {"epoch": flat // len(self.rows), "pos": flat % len(self.rows)}

    def load_state_dict(self, state: Optional[Dict[str, int]]) -> None:
        if state:
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
            self._order = self._make_order()
