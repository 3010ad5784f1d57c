"""Prompt rows of a dataset, epoch after epoch, with a resumable position.

A dataset is a local ``.jsonl``/``.json``/``.parquet`` file (the file is the split), a local dataset directory laid out
as on the Hugging Face Hub, or a hub name (`launch.resolve` downloads it on the login node)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from areal_hpc import toy
from areal_hpc.config.errors import ConfigError

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
# where validation data comes from when no split is given, by preference
EVAL_SPLITS = ("test", "validation", "valid", "eval", "dev")


class DatasetError(ConfigError):
    """A dataset that cannot be read as configured: its ``field`` (``path``, ``name``, ``split``: the key within the
    dataset's section) is at fault."""

    field = property(lambda self: self.key)
    message = property(lambda self: self.problem)


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _quiet_datasets() -> None:  # the caller reports what goes wrong
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def dataset_splits(path: str, name: Optional[str] = None) -> Dict[str, List[str]]:
    """``{split: [data files]}`` of a dataset directory (or a hub name, when online) for config ``name``, without
    reading the data."""
    from datasets import get_dataset_config_names, load_dataset_builder

    _quiet_datasets()
    try:
        configs = get_dataset_config_names(path)
    except Exception as e:  # noqa: BLE001 - EmptyDatasetError and friends: datasets says what is wrong
        if type(e).__name__ == "EmptyDatasetError":
            raise DatasetError("path", f"{path} holds no data files", "a dataset directory holds .jsonl/.json/.parquet"
                               "/.csv files, e.g. data/train-00000.parquet, or a README.md listing them") from None
        raise DatasetError("path", f"{path} is not a readable dataset: {one_line(e)}") from None
    if name is not None and name not in configs:
        raise DatasetError("name", f"{name!r} is not a config of {path} (configs: {', '.join(configs)})",
                           "set it to one of them")
    if name is None and len(configs) > 1 and "default" not in configs:
        raise DatasetError("name", f"{path} has several configs ({', '.join(configs)}) and none is chosen",
                           f"set it, e.g. name={configs[0]}")
    try:
        builder = load_dataset_builder(path, name)
    except Exception as e:  # noqa: BLE001
        raise DatasetError("path", f"{path} is not a readable dataset: {one_line(e)}") from None
    files = builder.config.data_files or {}
    return {str(split): [str(f) for f in fs] for split, fs in files.items()}


def choose_split(splits: Sequence[str], split: str = "", which: str = "train", where: str = "") -> str:
    """``split`` when given (it must exist); else ``train`` for ``which="train"``, the first of `EVAL_SPLITS` for
    validation data, or the only split."""
    splits = list(splits)
    listing = (f" in {where}" if where else "") + f" (splits: {', '.join(splits)})"
    if split:
        if split not in splits:
            hint = "set it to one of them"
            if m := re.fullmatch(r"(\w+)\[(?::(\d+)|.*)\]", split):  # `datasets`' slice syntax, e.g. train[:100]
                hint = f"slices are not read: set split={m[1]} and limit={m[2] or 'N'} for its first {m[2] or 'N'} rows"
            raise DatasetError("split", f"no split {split!r}{listing}", hint)
        return split
    prefer = ("train",) if which == "train" else EVAL_SPLITS
    found = next((s for s in prefer if s in splits), splits[0] if len(splits) == 1 else None)
    if found is not None:
        return found
    raise DatasetError("split", f"no {'/'.join(prefer)} split{listing}", "set it to one of them")


def iter_json_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, row)`` of a JSON Lines file, or of a ``.json`` file holding one array of rows (index + 1 for a
    line); `DatasetError` naming the file and line for a bad one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError("path", f"{path} cannot be read: {e.strerror or e}", "check its permissions") from None
    if b"\x00" in raw[:65536]:
        raise DatasetError("path", f"{path} is a binary file (it holds NUL bytes), not JSON text",
                           "point at a .jsonl/.json text file, or a .parquet file")
    if path.endswith(".json"):
        try:
            whole = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            whole = None  # maybe JSON Lines under a .json name: checked line by line below
        if isinstance(whole, list):
            for i, row in enumerate(whole):
                if not isinstance(row, dict):
                    raise DatasetError("path", f"{path}: element {i} is a {type(row).__name__}, not an object")
                yield i + 1, row
            return
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError("path", f"{path} line {n} is not UTF-8 text ({e.reason} at byte {e.start})",
                               "is it a binary file?") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            raise DatasetError("path", f"{path} line {n} is not valid JSON: {one_line(e, 120)}",
                               "one JSON object per line") from None
        if not isinstance(row, dict):
            raise DatasetError("path", f"{path} line {n} is a JSON {type(row).__name__}, not an object",
                               "one JSON object per line")
        yield n, row


# `datasets`' packaged builders by file suffix (anything else, e.g. .jsonl.gz, is left to `datasets` to infer).
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "text",
             ".arrow": "arrow"}


def _blank(files: Sequence[str]) -> bool:
    """Local files holding nothing but whitespace (`datasets` fails on them instead of returning no rows)."""
    return all(Path(f).stat().st_size <= 4096 and not Path(f).read_bytes().strip() for f in files)


def _open(path: str, name: Optional[str], split: str, which: str, streaming: bool):
    """The ``datasets`` object for one split of ``path`` (file, directory or hub name); None for blank files. A local
    directory's split is read as its data files: `datasets` caches a directory by name and layout only (two alike
    would share a stale entry), data files by paths and mtimes."""
    from datasets import load_dataset

    _quiet_datasets()
    if Path(path).is_file():  # one file is one split; name/split do not apply
        if Path(path).suffix not in DATA_FILE_SUFFIXES:
            raise DatasetError("path", f"unsupported dataset file type {Path(path).suffix!r} ({path})",
                               "use .jsonl, .json or .parquet, or a dataset directory")
        files, split = [path], "train"
    else:
        splits = dataset_splits(path, name)
        split = choose_split(splits, split, which, where=path)
        files = splits[split]
    if Path(path).exists():
        if _blank(files):
            return None
        builders = {_BUILDERS.get(Path(f).suffix) for f in files}
        if len(builders) == 1 and None not in builders:
            return load_dataset(builders.pop(), data_files={split: files}, split=split, streaming=streaming)
    return load_dataset(path, name=name, split=split, streaming=streaming)


# `datasets`' split names by the keywords of file names (its data_files.SPLIT_KEYWORDS)
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}


def _jsonl_splits(directory: str) -> Dict[str, List[str]]:
    """The .jsonl files of a directory by split, named as `datasets` names them: by a keyword in the file name
    (train.jsonl, test-00000.jsonl); one train split when no name has one."""
    splits: Dict[Optional[str], List[str]] = {}
    for f in sorted(Path(directory).glob("*.jsonl")):
        words = set(re.split(r"[-._ 0-9]+", f.name))
        split = next((s for s, keys in _SPLIT_KEYWORDS.items() if words & set(keys)), None)
        splits.setdefault(split, []).append(str(f))
    return {"train": splits[None]} if list(splits) == [None] else {s: fs for s, fs in splits.items() if s}


def load_rows(path: str, limit: int = 0, name: Optional[str] = None, split: str = "",
              which: str = "train") -> List[Dict[str, Any]]:
    """All rows (the first ``limit`` when > 0) of a dataset file, directory or hub name; ``split=""`` picks one by
    ``which`` (`choose_split`). Without `datasets` (bare GPU images): .jsonl files, or directories of them."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        if Path(path).is_dir():
            splits = _jsonl_splits(path)
            files = splits[choose_split(splits, split, which, where=path)] if splits else []
        else:
            files = [path]
        if not files or not all(f.endswith(".jsonl") for f in files):
            raise
        rows = [row for f in files for _, row in iter_json_rows(f)]
        return rows[:limit] if limit else rows

    return _read(path, name, split, which,
                 lambda ds: (ds.select(range(min(limit, len(ds)))) if limit else ds).to_list())


def head_rows(path: str, n: int, name: Optional[str] = None, split: str = "", which: str = "train"
              ) -> List[Dict[str, Any]]:
    """The first ``n`` rows, read lazily (streaming): no full read or conversion of a big dataset."""
    return _read(path, name, split, which, lambda ds: list(ds.take(n)), streaming=True)


def _read(path, name, split, which, rows: Callable[[Any], List[Dict[str, Any]]], streaming: bool = False):
    try:
        ds = _open(path, name, split, which, streaming)
        return rows(ds) if ds is not None else []
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the dataset, not datasets' traceback
        if not streaming and "corresponds to no data" in str(e):  # a split whose files hold no rows
            return []
        raise DatasetError("path", f"{path} could not be read: {one_line(e)}") from e


def load_dataset_rows(ds, which: str = "train") -> List[Dict[str, Any]]:
    """The rows of ``train_dataset`` (``which="train"``) or ``valid_dataset``, a `DatasetConfig`."""
    path = toy.resolve_dataset(ds.path, split=which)
    return load_rows(path, limit=ds.limit, name=ds.name, split=ds.split, which=which)


class PromptLoader:
    """Infinite (or ``epochs``-bounded) iterator over rows, reshuffled each epoch from ``seed``, resumable."""

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
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make_order()
        if self.epochs and self.epoch >= self.epochs:  # also for a loader resumed at its end
            raise StopIteration
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
