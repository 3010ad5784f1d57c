"""`NameTable`: the tables of what a user adds by name (rewards, adapters, workflows, trainers)."""

from __future__ import annotations


class NameTable(dict):
    """Objects by name: ``@table.register("name")`` adds one; an unknown name's KeyError lists the known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def deco(obj):
            self[name] = obj
            return obj
        return deco

    def __missing__(self, name: str):
        raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
