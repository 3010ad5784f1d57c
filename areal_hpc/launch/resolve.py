"""The login node resolves models and datasets; compute nodes stay offline.

Compute nodes often have no internet, and a bad model or dataset found there costs an allocation. So `submit` downloads
hub names into ``cluster.hf_cache`` on the shared filesystem, points the config at the local snapshots, and checks that
every model and dataset loads (JSON files whole, other formats their first rows), before the run dir is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from areal_hpc.config import (ConfigError, DatasetConfig, ExperimentConfig, datasets_in_use, looks_like_hub_name,
                              models_in_use, prompt_tokenizer_path, raw_text_refusal)
from areal_hpc.launch.plan import hf_cache_dir
from areal_hpc.rollout.adapters import apply_adapter, get_adapter
from areal_hpc.rollout.data import DatasetError, choose_split, dataset_splits, head_rows, iter_json_rows, one_line

# Rows checked for columns where a file is not read whole (parquet, csv, ...).
HEAD_ROWS = 64
# Files a training run never reads; skipped when downloading a model.
MODEL_IGNORE = ["*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.pth", "original/*", "onnx/*"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def resolve(cfg: ExperimentConfig) -> None:
    """Download hub names into the shared cache, check every model and dataset, and rewrite the config in place to
    local absolute paths (and concrete splits)."""
    cache, explicit = hf_cache_dir(cfg), bool(cfg.cluster.hf_cache)
    cfg.cluster.hf_cache = str(cache)  # absolute in config.yaml: steps get it through plan.step_env
    paths = [getattr(o, a) for _, o, a in models_in_use(cfg)] + [ds.path for _, ds, _ in datasets_in_use(cfg)]
    if all(p.startswith("toy:") for p in paths):
        return
    _quiet()
    made = [d for d in (cache, *cache.parents) if not d.exists()]
    try:
        _resolve_paths(cfg, cache, explicit, paths)
    except ConfigError:  # what this submit made goes again, but for a download into it (the next submit's)
        for d in [p for top in made[:1] for p, _, _ in os.walk(top, topdown=False)] + made[1:]:
            with contextlib.suppress(OSError):  # only empty dirs
                os.rmdir(d)
        raise


def _resolve_paths(cfg: ExperimentConfig, cache: Path, explicit: bool, paths: List[str]) -> None:
    if any(looks_like_hub_name(p) for p in paths):
        try:  # with the run's umask (`submit` has it); a shared cache is best made beforehand, with the modes it needs
            if not explicit:
                make_fileroot(cfg)
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("cluster.hf_cache", f"cannot create {cache}: {one_line(e)}",
                              "a writable directory on a filesystem every node mounts") from None
    done: Dict[str, str] = {}
    templated: Dict[str, bool] = {}  # local model dir -> its tokenizer has a chat template
    for key, owner, attr in models_in_use(cfg):
        path = getattr(owner, attr)
        if path not in done and not path.startswith("toy:"):
            local = _local_or_download(key, path, "model", cache)
            templated[str(local)] = check_model_dir(key, local)
            done[path] = str(local)
        setattr(owner, attr, done.get(path, path))
    tokenizer = prompt_tokenizer_path(cfg)
    for key, ds, which in datasets_in_use(cfg):
        raw = (f"{key}.chat_template=none" if ds.chat_template == "none"
               else "a toy: model's tokenizer has no chat template" if tokenizer.startswith("toy:")
               else f"the tokenizer of {tokenizer} has no chat template" if templated.get(tokenizer) is False else None)
        resolve_dataset(key, ds, which, cache, raw)
        if ds.chat_template == "auto" and templated.get(prompt_tokenizer_path(cfg)) is False:  # else found on a node
            for name, hint in (("system_prompt", "drop it, or put the instruction in the prompts"),
                               ("chat_template_kwargs", "drop them, or use a model with a chat template")):
                if getattr(ds, name):
                    raise ConfigError(f"{key}.{name}", raw_text_refusal(
                        name, f"the tokenizer of {prompt_tokenizer_path(cfg)} has none"), hint)


def make_fileroot(cfg: ExperimentConfig) -> None:
    """Create a missing ``cluster.fileroot`` 0755: it is shared by users, each of whom has a private
    ``{fileroot}/{user}`` below it (0700, or 0750 with cluster.group_readable)."""
    root = Path(os.path.expanduser(cfg.cluster.fileroot)).resolve()
    for d in reversed([root, *root.parents]):
        if not d.exists():
            with contextlib.suppress(FileExistsError):  # made meanwhile by another submit: its modes stay
                d.mkdir()
                os.chmod(d, 0o755)


def _quiet() -> None:
    """Progress bars only on a terminal; no library warnings: a problem is one line of ours."""
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        disable_progress_bars()
    for name in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()


def download(key: str, repo_id: str, repo_type: str, cache: Path) -> str:
    """The local snapshot directory of hub repo ``repo_id`` (downloaded now unless cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    print(f"hub       {key}: {repo_type} {repo_id} -> {cache / 'hub'}", flush=True)
    try:
        return snapshot_download(repo_id, repo_type=repo_type, cache_dir=str(cache / "hub"),
                                 ignore_patterns=MODEL_IGNORE if repo_type == "model" else None)
    except GatedRepoError:
        raise ConfigError(key, f"{repo_type} {repo_id!r} on the hub is gated",
                          "accept its terms on huggingface.co and log in on this node (`hf auth login`)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ConfigError(key, f"{repo_id!r} is not a local path and the hub has no {repo_type} by that name",
                          "check the name (org/name), or give a local directory") from None
    except LocalEntryNotFoundError:
        raise ConfigError(key, f"{repo_id!r} is not a local path, the hub cannot be reached and {cache / 'hub'} "
                          "holds no copy", "submit where the hub is reachable, HF_HUB_OFFLINE unset; "
                          "or give a local directory") from None
    except HfHubHTTPError as e:
        raise ConfigError(key, f"downloading {repo_type} {repo_id!r} failed: {one_line(e)}") from None
    except OSError as e:
        raise ConfigError("cluster.hf_cache", f"cannot store {repo_id!r} in {cache}: {one_line(e)}",
                          "a writable directory on a filesystem every node mounts") from None


def _local_or_download(key: str, path: str, repo_type: str, cache: Path) -> Path:
    p = Path(os.path.expanduser(path))
    if p.exists():
        return Path(os.path.abspath(p))
    if looks_like_hub_name(path):
        return Path(download(key, path, repo_type, cache))
    raise ConfigError(key, f"{repo_type} path {path!r} does not exist", "give a local path, or a hub name (org/name)")


def check_model_dir(key: str, p: Path) -> bool:
    """config.json parses and loads, weights are there, the tokenizer loads and fits the model. Returns whether the
    tokenizer has a chat template."""
    if p.is_file():
        raise ConfigError(key, f"{p} is a file, not a model directory",
                          "point at the directory save_pretrained wrote: config.json, weights, tokenizer")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(key, f"{p} has no config.json", "point at a HF model directory, as save_pretrained writes it")
    try:
        json.loads(cfg_file.read_bytes().decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError too
        raise ConfigError(key, f"{cfg_file} is not valid JSON: {one_line(e, 120)}",
                          "restore it: save_pretrained or a fresh download writes it") from None
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise ConfigError(key, f"{p} holds no weights (*.safetensors or pytorch_model*.bin)",
                          "point at a complete model directory")
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf_cfg = AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad values: transformers says which
        raise ConfigError(key, f"{cfg_file} does not load: {one_line(e)}",
                          "a model type this transformers version knows, with valid values") from None
    if not any((p / f).is_file() for f in TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise ConfigError(key, f"{p} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)",
                          "save the tokenizer next to the model with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(key, f"the tokenizer in {p} does not load: {one_line(e)}",
                          "save the tokenizer next to the model with tokenizer.save_pretrained") from None
    vocab = getattr(hf_cfg, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ConfigError(key, f"the tokenizer in {p} has {len(tok)} tokens but the model's vocab_size is {vocab}",
                          "the tokenizer belongs to another model")
    return bool(getattr(tok, "chat_template", None))


def resolve_dataset(key: str, ds: DatasetConfig, which: str, cache: Path, raw: Optional[str] = None) -> None:
    """Check dataset ``key`` and rewrite ``ds.path`` (local, absolute) and ``ds.split`` (the one read). ``raw``: why
    prompts are raw text (no chat template renders messages), where that is known here."""
    if ds.path.startswith("toy:"):
        return
    local = _local_or_download(f"{key}.path", ds.path, "dataset", cache)
    try:
        if local.is_file():
            files, where, empty_key = [str(local)], str(local), "path"
        else:
            splits = dataset_splits(str(local), ds.name)
            split = choose_split(splits, ds.split, which, where=str(local))
            files = splits[split]
            where, empty_key = f"split {split!r} of {local}", "split"
            ds.split = split
        checked = []  # per row: why the trainer will leave it out (no prompt it can render), or None
        for f in files:  # every line of JSON files: cheap, and a bad line anywhere is found here
            if f.endswith((".jsonl", ".json")):
                checked += [check_row(key, ds, row, f"{f} line {n}", raw) for n, row in iter_json_rows(f)]
        head = head_rows(str(local), HEAD_ROWS, name=ds.name, split=ds.split, which=which)
    except DatasetError as e:
        raise ConfigError(f"{key}.{e.field}", e.message, e.hint) from None
    if not head:
        raise ConfigError(f"{key}.{empty_key}", f"{where} has no rows", "point at a dataset with data")
    checked += [check_row(key, ds, row, f"row {i} of {where}", raw) for i, row in enumerate(head)]
    if all(checked):  # none left: the run would fail on the node (some left out: the trainer warns)
        raise checked[0]
    ds.path = str(local)


def check_row(key: str, ds: DatasetConfig, row: Dict[str, Any], where: str,
              raw: Optional[str] = None) -> Optional[ConfigError]:
    """The row, after the dataset's adapter, gives a prompt (string) or messages (role/content list) and an answer.
    Returned, not raised: why the trainer will leave out a row with no prompt it can render (messages that end with
    the reply; messages where prompts are raw text, ``raw`` says why)."""
    if ds.adapter:
        try:
            fn = get_adapter(ds.adapter)
        except KeyError as e:
            raise ConfigError(f"{key}.adapter", str(e.args[0])) from None
        try:
            fn(dict(row))
        except KeyError as e:
            raise ConfigError(f"{key}.adapter", f"{ds.adapter!r} needs column {e.args[0]!r}, missing in {where} "
                              f"(columns: {', '.join(sorted(row)) or 'none'})",
                              "point at data this adapter reads, or drop the adapter") from None
        except Exception as e:  # noqa: BLE001 - whatever a user's adapter raises on this row
            raise ConfigError(f"{key}.adapter", f"{ds.adapter!r} cannot map {where}: {one_line(e, 160)}") from None
        row = apply_adapter([row], ds.adapter, ds.prompt_key, ds.answer_key, ds.messages_key)[0]
    columns = ", ".join(sorted(row)) or "none"
    prompt, messages = row.get(ds.prompt_key), row.get(ds.messages_key)
    if ds.prompt_key == ds.messages_key and isinstance(prompt, list):  # TRL's conversational `prompt` column
        prompt = None
    if prompt is None and messages is None:
        hint = (f"GSM8K-style rows: set {key}.adapter=gsm8k" if {"question", "answer"} <= set(row) and not ds.adapter
                else f"set {key}.prompt_key (or {key}.messages_key) to the column holding the prompt")
        raise ConfigError(f"{key}.prompt_key", f"{where} has no {ds.prompt_key!r} (or {ds.messages_key!r}) column "
                          f"(columns: {columns})", hint)
    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError(f"{key}.prompt_key", f"{where}: {ds.prompt_key!r} must be a string, got "
                          f"{type(prompt).__name__} {str(prompt)[:40]!r}",
                          f"chat messages? set {key}.messages_key={ds.prompt_key}" if isinstance(prompt, list)
                          else None)
    if prompt is None and not (isinstance(messages, list) and messages
                               and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise ConfigError(f"{key}.messages_key", f"{where}: {ds.messages_key!r} is not a list of "
                          "{role, content} messages", "e.g. [{\"role\": \"user\", \"content\": \"...\"}]")
    if prompt is None and messages[-1]["role"] == "assistant":  # a finished conversation (rollout.prompts refuses it)
        return ConfigError(f"{key}.messages_key", f"{where}: {ds.messages_key!r} ends with the assistant's reply; a "
                          "prompt ends where the reply begins", f"give the messages before the reply as "
                          f"{ds.messages_key!r} and the reply as {ds.answer_key!r} (a column of its own)")
    if prompt is None and raw:
        none = ds.chat_template == "none"
        return ConfigError(f"{key}.chat_template" if none else f"{key}.prompt_key",
                          f"{where} has chat messages but no {ds.prompt_key!r} string, and prompts are raw text: "
                          f"{raw}", f"{key}.chat_template=auto with a model that has one" if none else
                          f"give a raw-text {ds.prompt_key!r} column, or use a model whose tokenizer has a chat "
                          "template")
    if row.get(ds.answer_key) is None:
        raise ConfigError(f"{key}.answer_key", f"{where} has no {ds.answer_key!r} column (columns: {columns})",
                          f"set {key}.answer_key to the column holding the answer")
    return None
