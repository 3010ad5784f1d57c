"""The login node resolves, compute nodes stay offline.

`submit` turns hub names into local snapshots in the shared cache (from a small HTTP server
standing in for the Hub via HF_ENDPOINT, or from a hub cache laid out by hand with the hub
offline), writes local paths into the run's config.yaml, and steps run with the hub offline: a
local run trains from the resolved paths with the hub gone. Bad models and datasets exit 2 with
one line naming the key, before anything is written or submitted.
"""

import getpass
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from chatml import build_chatml_model
from fake_hub import COMMIT, FakeHub
from test_datasets import make_hub_dataset, write_jsonl, write_parquet

from areal_hpc import toy
from areal_hpc.cli.main import main
from areal_hpc.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
GSM8K_CONFIG = str(REPO / "configs" / "gsm8k-grpo.yaml")

SUMS_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: hard
  data_files:
  - split: train
    path: hard/train-*
---
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny real model directory (save_pretrained output: config, weights, tokenizer)."""
    return toy.build_model(tmp_path_factory.mktemp("model") / "tiny-qwen", hidden=64, layers=1)


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable for this process, as HF_HUB_OFFLINE=1 makes it (read at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def lay_out_cache(hub_cache: Path, repo_type: str, repo_id: str, src: Path) -> Path:
    """``src`` as the cached snapshot of ``repo_id`` at `COMMIT`, ``refs/main`` pointing at it:
    what `snapshot_download` leaves behind."""
    folder = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    shutil.copytree(src, snap)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snap


def sums_dataset(root: Path) -> Path:
    """A hub-layout dataset of quickstart rows ("3+4=" -> "7"): configs main (train, test) and hard."""
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(SUMS_README)
    write_jsonl(root / "main" / "train-00000-of-00001.jsonl", toy.make_sum_rows(64, seed=0))
    write_jsonl(root / "main" / "test-00000-of-00001.jsonl", toy.make_sum_rows(16, seed=1))
    write_jsonl(root / "hard" / "train-00000-of-00001.jsonl", toy.make_sum_rows(8, seed=2))
    return root


def run_config(tmp_path, exp: str) -> dict:
    rd = next(tmp_path.glob(f"*/{exp}/*"))
    return yaml.safe_load((rd / "config.yaml").read_text()), json.loads((rd / "plan.json").read_text())


# ------------------------------------------------------------------ a hub cache laid out by hand

def test_gsm8k_config_resolves_from_hub_cache_offline(tmp_path, model_dir, offline, capsys):
    """configs/gsm8k-grpo.yaml with the model and openai/gsm8k by hub name, from the shared cache
    with the hub offline: config.yaml gets the snapshot paths and the concrete splits."""
    hf = tmp_path / "hf"
    model_snap = lay_out_cache(hf / "hub", "model", "acme/Tiny-Instruct", model_dir)
    data_snap = lay_out_cache(hf / "hub", "dataset", "openai/gsm8k", make_hub_dataset(tmp_path / "src" / "gsm8k"))
    shipped = yaml.safe_load(Path(GSM8K_CONFIG).read_text())
    assert shipped["train_dataset"]["path"] == shipped["valid_dataset"]["path"] == "openai/gsm8k"
    # The user sets the model (here by hub name) and the partition; the rest is the shipped config.
    rc = main(["submit", GSM8K_CONFIG, f"cluster.fileroot={tmp_path / 'runs'}", f"cluster.hf_cache={hf}",
               "cluster.partition=gpu", "trainer.ppo.actor.path=acme/Tiny-Instruct", "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    cfg, plan = run_config(tmp_path / "runs", "gsm8k-grpo")
    assert cfg["trainer"]["ppo"]["actor"]["path"] == str(model_snap)
    assert cfg["train_dataset"]["path"] == cfg["valid_dataset"]["path"] == str(data_snap)
    assert (cfg["train_dataset"]["name"], cfg["train_dataset"]["split"]) == ("main", "train")
    assert (cfg["valid_dataset"]["name"], cfg["valid_dataset"]["split"]) == ("main", "test")
    assert cfg["cluster"]["hf_cache"] == str(hf)
    for step in plan["steps"]:  # every step offline, with the shared cache
        assert {k: step["env"].get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")} == \
            dict.fromkeys(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"), "1")
        assert step["env"]["HF_HOME"] == str(hf) and step["env"]["HF_DATASETS_CACHE"] == str(hf / "datasets")
    script = next((tmp_path / "runs").glob("*/gsm8k-grpo/*/sbatch/allocation.sbatch")).read_text()
    assert "HF_HUB_OFFLINE=1" in script and f"HF_HOME={hf}" in script


def test_local_paths_are_made_absolute_and_toy_untouched(tmp_path, model_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "work" / "sums.jsonl", toy.make_sum_rows(8))
    shutil.copytree(model_dir, tmp_path / "work" / "model")
    monkeypatch.chdir(tmp_path / "work")
    assert main(["submit", QUICKSTART, f"cluster.fileroot={tmp_path / 'runs'}", "trainer.ppo.actor.path=model",
                 "train_dataset.path=sums.jsonl", "--dry-run"]) == 0, capsys.readouterr().err
    cfg, _ = run_config(tmp_path / "runs", "quickstart")
    assert cfg["trainer"]["ppo"]["actor"]["path"] == str(tmp_path / "work" / "model")
    assert cfg["train_dataset"]["path"] == str(data) and cfg["valid_dataset"]["path"] == "toy:sum-256"
    assert cfg["cluster"]["hf_cache"].endswith("/hf-cache")
    assert not Path(cfg["cluster"]["hf_cache"]).exists()  # nothing to download: nothing created


def test_a_prompt_column_of_chat_messages(tmp_path, capsys):
    """TRL's conversational format: `prompt` holds [{role, content}]. messages_key=prompt was refused ("'prompt' must
    be a string, got list"); with the default keys the error now says to set it. Messages need a chat template: with
    the toy model's tokenizer (none) they are refused at submit, not left out on the node (all rows: the run failed)."""
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)} for i in range(3)]
    chat_model = build_chatml_model(tmp_path / "chatml")
    for path in (write_jsonl(tmp_path / "conv.jsonl", rows), write_parquet(tmp_path / "conv.parquet", rows)):
        argv = ["submit", QUICKSTART, f"cluster.fileroot={tmp_path / 'runs'}", f"train_dataset.path={path}",
                "--dry-run"]
        assert main(argv + ["train_dataset.messages_key=prompt", f"trainer.ppo.actor.path={chat_model}"]) == 0, \
            capsys.readouterr().err
        assert main(argv + [f"trainer.ppo.actor.path={chat_model}"]) == 2
        assert "'prompt' must be a string, got list" in (err := capsys.readouterr().err)
        assert "set train_dataset.messages_key=prompt" in err
        assert main(argv + ["train_dataset.messages_key=prompt"]) == 2
        assert "has chat messages but no 'prompt' string, and prompts are raw text: a toy: model's tokenizer has no " \
               "chat template" in capsys.readouterr().err


def test_rows_the_trainer_leaves_out_are_refused_only_when_none_is_left(tmp_path, capsys):
    """A row of chat messages has no prompt the toy model's tokenizer (no template) can render: the trainer leaves it
    out with a warning. Some such rows pass submit; a dataset of only such rows is refused there, not on the node."""
    rows = [{"prompt": "1+1=", "answer": "2"}, {"messages": [{"role": "user", "content": "1+2="}], "answer": "3"}]
    argv = ["submit", QUICKSTART, f"cluster.fileroot={tmp_path / 'runs'}", "--dry-run"]
    assert main(argv + [f"train_dataset.path={write_jsonl(tmp_path / 'mixed.jsonl', rows)}"]) == 0, \
        capsys.readouterr().err
    assert main(argv + [f"train_dataset.path={write_parquet(tmp_path / 'messages.parquet', rows[1:])}"]) == 2
    assert "row 0 of" in (err := capsys.readouterr().err) and "has chat messages but no 'prompt' string" in err


# ------------------------------------------------------------------ a hub over HTTP, then none

def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return {**env, **extra}


def test_hub_names_download_on_login_then_run_offline(tmp_path, model_dir):
    hub_root = tmp_path / "hub"
    shutil.copytree(model_dir, hub_root / "models" / "acme" / "tiny-qwen")
    sums_dataset(hub_root / "datasets" / "acme" / "sums")
    argv = [sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path / 'runs'}",
            "trainer.ppo.actor.path=acme/tiny-qwen", "train_dataset.path=acme/sums", "train_dataset.name=main",
            "valid_dataset.path=acme/sums", "valid_dataset.name=main", "stats.progress_bar=False"]
    # The login node: the hub is reachable; --dry-run resolves (downloads) and writes the run dir.
    with FakeHub(hub_root) as hub:
        p = subprocess.run([*argv, "--dry-run"], env=_env(HF_ENDPOINT=hub.url), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        asked = list(hub.requests)
    assert any("/api/models/acme/tiny-qwen/" in r for r in asked) and any("/datasets/acme/sums/resolve/" in r
                                                                        for r in asked)
    cfg, plan = run_config(tmp_path / "runs", "quickstart")
    hub_cache = Path(cfg["cluster"]["hf_cache"]) / "hub"
    assert cfg["trainer"]["ppo"]["actor"]["path"] == str(hub_cache / "models--acme--tiny-qwen" / "snapshots" / COMMIT)
    assert cfg["train_dataset"]["path"] == str(hub_cache / "datasets--acme--sums" / "snapshots" / COMMIT)
    assert (cfg["train_dataset"]["split"], cfg["valid_dataset"]["split"]) == ("train", "test")
    assert all(s["env"]["HF_HUB_OFFLINE"] == "1" for s in plan["steps"])
    assert hub_cache.parent == tmp_path / "runs" / getpass.getuser() / "hf-cache"
    assert hub_cache.parent.stat().st_mode & 0o777 == 0o700  # the user's, like their runs

    # The hub is gone (its address refuses connections): the same submit runs a few steps, the
    # login side from the cache, the steps from the local paths in config.yaml.
    p = subprocess.run([*argv, "trainer.total_train_steps=2", "rollout.batch_size=4", "rollout.n_samples=2",
                        "saver.freq_steps=0"], env=_env(HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.url),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rd = next((tmp_path / "runs").glob("*/quickstart/run0"))
    logs = "".join(f"\n--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((rd / "logs").glob("*")))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + logs
    assert [m["step"] for m in read_metrics(rd / "metrics.jsonl")] == [1, 2]
    cfg2, _ = run_config(tmp_path / "runs", "quickstart")
    assert cfg2["trainer"]["ppo"]["actor"]["path"] == cfg["trainer"]["ppo"]["actor"]["path"]
    assert cfg2["train_dataset"]["path"] == cfg["train_dataset"]["path"]
    assert len(hub.requests) == len(asked)  # nothing reached the (stopped) hub


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written

@pytest.fixture(scope="module")
def bad(tmp_path_factory, model_dir) -> dict:
    """Broken models and datasets, by name."""
    d = tmp_path_factory.mktemp("bad")
    paths = {"model": str(model_dir)}
    rows = toy.make_sum_rows(6)
    paths["qa"] = write_jsonl(d / "qa.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in rows])
    paths["no_answer"] = write_jsonl(d / "no_answer.jsonl", [{"prompt": r["prompt"]} for r in rows])
    paths["int_prompt"] = write_jsonl(d / "int_prompt.jsonl", [{"prompt": 5, "answer": "1"}])
    paths["messages_only"] = write_jsonl(d / "messages_only.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    paths["conversation"] = write_jsonl(d / "conversation.jsonl", [  # SFT-style: the reply is the last message
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows])
    paths["conversation_answer"] = write_jsonl(d / "conversation_answer.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
         "answer": r["answer"]} for r in rows])
    paths["chat_model"] = str(build_chatml_model(d / "chat-model"))
    malformed = d / "malformed.jsonl"
    malformed.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+2=", "answer": "3"}\n{"prompt": "1+3=\n')
    paths["malformed"] = malformed
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    paths["binary"] = d / "binary.jsonl"
    (d / "latin1.jsonl").write_bytes('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "café 1+1=", "answer": "2"}\n'
                                     .encode("latin-1"))
    paths["latin1"] = d / "latin1.jsonl"
    (d / "empty.jsonl").write_text("")
    paths["empty"] = d / "empty.jsonl"
    paths["gsm8k"] = make_hub_dataset(d / "gsm8k", "jsonl", empty=[("socratic", "test")])
    paths["no_hash"] = write_jsonl(d / "no_hash.jsonl", [{"question": "2+2?", "answer": "four, I think"}])
    (d / "readme_only").mkdir()
    (d / "readme_only" / "README.md").write_text("# nothing here\n")
    paths["readme_only"] = d / "readme_only"
    (d / "sums.csv").write_text("prompt,answer\n1+1=,2\n")
    paths["csv"] = d / "sums.csv"

    def broken(name, edit):
        m = d / name
        shutil.copytree(model_dir, m)
        edit(m)
        paths[name] = m

    broken("not_json", lambda m: (m / "config.json").write_text('{"model_type": "qwen3", "hidden_size": 64,'))
    broken("bad_type", lambda m: (m / "config.json").write_text(json.dumps(
        {**json.loads((model_dir / "config.json").read_text()), "model_type": "no-such-arch"})))
    broken("no_tokenizer", lambda m: [(m / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")])
    broken("no_weights", lambda m: (m / "model.safetensors").unlink())
    broken("small_vocab", lambda m: (m / "config.json").write_text(json.dumps(
        {**json.loads((model_dir / "config.json").read_text()), "vocab_size": 8})))
    return {k: str(v) for k, v in paths.items()}


# (id, overrides with {placeholders} from `bad`, the key named, text of the message)
BAD_INPUTS = [
    ("missing-prompt-column", ["train_dataset.path={qa}"], "train_dataset.prompt_key",
     "line 1 has no 'prompt' (or 'messages') column (columns: answer, question)"),
    ("missing-answer-column", ["train_dataset.path={no_answer}"], "train_dataset.answer_key", "has no 'answer' column"),
    ("missing-column-valid", ["valid_dataset.path={no_answer}"], "valid_dataset.answer_key", "has no 'answer'"),
    ("prompt-not-text", ["train_dataset.path={int_prompt}"], "train_dataset.prompt_key",
     "'prompt' must be a string, got int"),
    ("malformed-line", ["train_dataset.path={malformed}"], "train_dataset.path",
     "malformed.jsonl line 3 is not valid JSON"),
    ("binary-file", ["train_dataset.path={binary}"], "train_dataset.path", "binary.jsonl is a binary file"),
    ("not-utf8", ["train_dataset.path={latin1}"], "train_dataset.path", "latin1.jsonl line 2 is not UTF-8 text"),
    ("empty-file", ["train_dataset.path={empty}"], "train_dataset.path", "empty.jsonl has no rows"),
    ("empty-split", ["valid_dataset.path={gsm8k}", "valid_dataset.name=socratic", "valid_dataset.adapter=gsm8k"],
     "valid_dataset.split", "split 'test' of"),
    ("unknown-config", ["train_dataset.path={gsm8k}", "train_dataset.name=socratik"], "train_dataset.name",
     "'socratik' is not a config of"),
    ("config-not-chosen", ["train_dataset.path={gsm8k}"], "train_dataset.name", "has several configs (main, socratic)"),
    ("unknown-split", ["valid_dataset.path={gsm8k}", "valid_dataset.name=main", "valid_dataset.split=validation"],
     "valid_dataset.split", "no split 'validation'"),
    ("no-data-files", ["train_dataset.path={readme_only}"], "train_dataset.path", "holds no data files"),
    ("unsupported-file-type", ["train_dataset.path={csv}"], "train_dataset.path",
     "unsupported dataset file type '.csv'"),
    ("missing-model", ["trainer.ppo.actor.path=/no/such/model"], "trainer.ppo.actor.path",
     "model path '/no/such/model' does not exist"),
    ("missing-dataset", ["valid_dataset.path=/no/such/data.jsonl"], "valid_dataset.path",
     "dataset path '/no/such/data.jsonl' does not exist"),
    ("model-without-config", ["trainer.ppo.actor.path={readme_only}"], "trainer.ppo.actor.path", "has no config.json"),
    ("adapter-columns", ["train_dataset.path=toy:sum", "train_dataset.adapter=gsm8k", "valid_dataset.path={no_answer}",
                         "valid_dataset.adapter=gsm8k"], "valid_dataset.adapter", "needs column 'question'"),
    ("adapter-rejects-row", ["train_dataset.path={no_hash}", "train_dataset.adapter=gsm8k"], "train_dataset.adapter",
     "no_hash.jsonl line 1"),
    ("hub-dataset-unreachable", ["train_dataset.path=nobody/no-such-data"], "train_dataset.path",
     "'nobody/no-such-data' is not a local path, the hub cannot be reached"),
    ("hub-model-typo", ["trainer.ppo.actor.path=models/qwen3"], "trainer.ppo.actor.path",  # a local dir mistyped
     "'models/qwen3' is not a local path, the hub cannot be reached"),
    ("model-path-is-a-file", ["trainer.ppo.actor.path={model}/model.safetensors"], "trainer.ppo.actor.path",
     "is a file, not a model directory"),
    ("config-json-not-json", ["trainer.ppo.actor.path={not_json}"], "trainer.ppo.actor.path",
     "config.json is not valid JSON"),
    ("config-json-unknown-arch", ["trainer.ppo.actor.path={bad_type}"], "trainer.ppo.actor.path",
     "config.json does not load"),
    ("no-tokenizer", ["trainer.ppo.actor.path={no_tokenizer}"], "trainer.ppo.actor.path", "has no tokenizer files"),
    ("no-weights", ["trainer.ppo.actor.path={no_weights}"], "trainer.ppo.actor.path", "holds no weights"),
    ("tokenizer-of-another-model", ["trainer.ppo.actor.path={small_vocab}"], "trainer.ppo.actor.path",
     "has 18 tokens but the model's vocab_size is 8"),
    ("server-model-unreachable", ["server.model_path=nobody/no-such-model"], "server.model_path",
     "the hub cannot be reached"),
    # a base model's tokenizer has no chat template: the system prompt had nowhere to go, found only on the node
    ("system-prompt-without-template", ["trainer.ppo.actor.path={model}", "train_dataset.system_prompt=Be brief."],
     "train_dataset.system_prompt", "has none: prompts are raw text"),
    ("template-kwargs-without-template", ["trainer.ppo.actor.path={model}",
                                          "train_dataset.chat_template_kwargs.enable_thinking=false"],
     "train_dataset.chat_template_kwargs", "has none: prompts are raw text"),
    # chat messages but no prompt string, and no template to render them: every row was refused on the node
    ("messages-without-template", ["train_dataset.path={messages_only}"], "train_dataset.prompt_key",
     "messages_only.jsonl line 1 has chat messages but no 'prompt' string, and prompts are raw text"),
    ("messages-with-template-none", ["trainer.ppo.actor.path={model}", "valid_dataset.path={messages_only}",
                                    "valid_dataset.chat_template=none"], "valid_dataset.chat_template",
     "valid_dataset.chat_template=none"),
    # a finished conversation is no prompt: the trainer left out every row (the run failed on the node); without an
    # answer column the hint was to set answer_key, though no column holds the reply
    ("conversation-rows", ["trainer.ppo.actor.path={chat_model}", "train_dataset.path={conversation_answer}"],
     "train_dataset.messages_key", "conversation_answer.jsonl line 1: 'messages' ends with the assistant's reply"),
    ("conversation-rows-no-answer", ["trainer.ppo.actor.path={chat_model}", "train_dataset.path={conversation}"],
     "train_dataset.messages_key", "conversation.jsonl line 1: 'messages' ends with the assistant's reply"),
]


def check_bad_input(bad, root, extra, key, text, capsys, mode_args) -> None:
    argv = ["submit", QUICKSTART, f"cluster.fileroot={root}", *mode_args, *[a.format(**bad) for a in extra]]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (extra, rc, err)
    assert lines[0].startswith(f"areal-hpc submit: error: {key}: ") and text in lines[0], lines[0]
    assert not list(Path(root).glob("**/config.yaml")), "a run dir was written"
    assert not Path(root).exists(), f"{[str(p) for p in Path(root).rglob('*')]} left behind"  # an hf-cache made for it


@pytest.mark.parametrize("extra, key, text", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_key(bad, tmp_path, extra, key, text, capsys, offline):
    check_bad_input(bad, tmp_path / "runs", extra, key, text, capsys, ["--dry-run"])


@pytest.mark.slurm
def test_bad_input_submits_nothing_to_slurm(bad, tmp_path, squeue_empty, capsys, offline):
    """The same inputs for a real `mode=slurm` submission: exit 2 and an empty queue."""
    assert squeue_empty()
    for _, extra, key, text in BAD_INPUTS:
        check_bad_input(bad, tmp_path / "runs", extra, key, text, capsys, ["mode=slurm", "cluster.partition=debug"])
        assert squeue_empty(), f"{extra}: something was queued"
