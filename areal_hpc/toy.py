"""Tiny local models, tokenizers and datasets, built on the fly and cached on disk (no hub): a
`toy:` spec such as ``toy:qwen3-h128-l2`` (model + char tokenizer) or ``toy:sum`` (``"a+b="`` prompts)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

from areal_hpc.config.validate import TOY_DATASET, TOY_MODEL
from areal_hpc.registry.util import atomic_write, temp_name

# Characters the toy tokenizer knows; ids follow the special tokens.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]
# Small on purpose: a random-init policy puts real mass on the digits, so GRPO learns from step one.
CHARS = list("0123456789+-*= ")
# Bump when the tokenizer or the model recipe changes: cached toy models are keyed by it.
RECIPE = "v2"


def _cache_dir(cache_dir: Optional[Path]) -> Path:
    return cache_dir or Path(os.environ.get("AREAL_HPC_CACHE", Path.home() / ".cache" / "areal-hpc"))


def build_tokenizer(out_dir: str | Path, vocab_size: int = 0):
    """A character-level fast tokenizer that round-trips through AutoTokenizer. ``vocab_size``
    pads the vocabulary with filler tokens (``<fNNN>``) to match a real architecture's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + CHARS
    words += [f"<f{i}>" for i in range(max(0, vocab_size - len(words)))]
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: str | Path, arch: str = "qwen3", hidden: int = 128, layers: int = 2,
                intermediate: Optional[int] = None, seed: int = 0) -> Path:
    """Random-init causal LM + char tokenizer saved as a normal HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    heads = max(1, hidden // 32)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=hidden,
                               intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                               max_position_embeddings=2048, tie_word_embeddings=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out_dir))
    return out_dir


def resolve_model(path: str, cache_dir: Optional[Path] = None) -> str:
    """Turn a `toy:` model spec into a built, cached directory; pass other paths through."""
    if not str(path).startswith("toy:"):
        return path
    if not (m := TOY_MODEL.match(path)):
        raise ValueError(f"bad toy model spec {path!r}: expected toy:<qwen3|llama|qwen2>[-h<hidden>]"
                         "[-l<layers>][-i<intermediate>], e.g. toy:qwen3-h128-l2")
    out = _cache_dir(cache_dir) / "models" / RECIPE / path.replace(":", "-")
    if not (out / "config.json").exists():
        tmp = out.with_name(temp_name(out.name))
        build_model(tmp, arch=m["arch"], hidden=int(m["h"] or 128), layers=int(m["l"] or 2),
                    intermediate=int(m["i"]) if m["i"] else None)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def make_sum_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt ``"a+b="`` (single digits), answer ``(a+b) mod 10``: one token to learn."""
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)} for a, b in pairs]


TOY_DATASETS = {"sum": make_sum_rows}


def resolve_dataset(path: str, split: str = "train", cache_dir: Optional[Path] = None) -> str:
    """Turn a `toy:<name>[-<rows>]` dataset spec into a cached jsonl file."""
    if not str(path).startswith("toy:"):
        return path
    if not (m := TOY_DATASET.match(path)) or m["name"] not in TOY_DATASETS:
        raise ValueError(f"bad toy dataset spec {path!r}: expected toy:<{'|'.join(TOY_DATASETS)}>[-<rows>]")
    n = int(m["n"] or 2048)
    out = _cache_dir(cache_dir) / "datasets" / f"{m['name']}-{n}-{split}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = TOY_DATASETS[m["name"]](n, seed=0 if split == "train" else 1)
        atomic_write(out, "".join(json.dumps(r) + "\n" for r in rows))
    return str(out)
