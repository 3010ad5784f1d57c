"""Dataset adapters, by name: ``fn(row) -> row`` with ``prompt`` (or ``messages``) and ``answer``
(other keys pass through to the reward function). Add one with ``@register_adapter("name")`` in a
``trainer.plugins`` module; select it with ``train_dataset.adapter=name``."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence

from areal_hpc.rollout.names import NameTable

ADAPTERS = NameTable("dataset adapter")
register_adapter, get_adapter = ADAPTERS.register, ADAPTERS.__getitem__

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def apply_adapter(rows: Sequence[Dict[str, Any]], name: str, prompt_key: str = "prompt", answer_key: str = "answer",
                  messages_key: str = "messages") -> List[Dict[str, Any]]:
    """Rows through adapter ``name`` ("" = unchanged), its fields under the dataset's configured keys.
    A row the adapter rejects raises ValueError naming the row's index."""
    if not name:
        return list(rows)
    fn = get_adapter(name)
    rename = {"prompt": prompt_key, "answer": answer_key, "messages": messages_key}
    out = []
    for i, row in enumerate(rows):
        try:
            new = fn(dict(row))
        except Exception as e:  # noqa: BLE001 - an AttributeError, IndexError, ... of a user's adapter too
            raise ValueError(f"adapter {name!r}: row {i}: {e}") from None
        for canon, key in rename.items():
            if key != canon and canon in new:
                new[key] = new.pop(canon)
        out.append(new)
    return out


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@register_adapter("gsm8k")
def gsm8k(row: Dict[str, Any]) -> Dict[str, Any]:
    """``{question, answer: "...\\n#### 42"}`` -> the question with an instruction to box the final answer, answer
    ``"42"`` (thousands separators and a trailing period dropped), the worked solution as ``solution``."""
    question, solution = row.pop("question"), row.pop("answer")
    m = _GSM8K_FINAL.search(str(solution))
    if not m:
        raise ValueError(f"answer has no '#### <number>' line: {str(solution)[-80:]!r}")
    final = m.group(1).replace(",", "").replace("$", "").strip().rstrip(".")
    if not final:
        raise ValueError(f"nothing after '####' in {str(solution)[-80:]!r}")
    return {**row, "prompt": f"{str(question).strip()}\n{BOXED_INSTRUCTION}", "answer": final, "solution": solution}
