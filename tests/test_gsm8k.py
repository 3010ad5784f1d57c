"""GSM8K without hand conversion: the `gsm8k` adapter, math-verify rewards on its answers, the
config keys, and a few PPO steps end to end on GSM8K-shaped rows through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from chatml import BOXED_SEVEN, build_chatml_model

from areal_hpc.config import ConfigError, load_config, validate
from areal_hpc.config.validate import DATASET_ADAPTERS
from areal_hpc.rollout.adapters import ADAPTERS, BOXED_INSTRUCTION, apply_adapter, register_adapter
from areal_hpc.rollout.rewards import get_reward
from areal_hpc.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]

# The first row of GSM8K's train split, as published.
NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
              "in April and May.\n#### 72",
}


def test_adapter_maps_gsm8k_rows():
    row = apply_adapter([dict(NATALIA, id=3)], "gsm8k")[0]
    assert row["prompt"] == NATALIA["question"] + "\n" + BOXED_INSTRUCTION and "\\boxed{}" in row["prompt"]
    assert row["answer"] == "72" and row["solution"] == NATALIA["answer"] and row["id"] == 3
    more = apply_adapter([{"question": "q", "answer": "x\n#### 1,234"}, {"question": "q", "answer": "#### -5"}],
                         "gsm8k")
    assert [r["answer"] for r in more] == ["1234", "-5"]
    # the dataset's keys: the adapter's prompt/answer land where the workflow reads them
    keyed = apply_adapter([NATALIA], "gsm8k", prompt_key="input", answer_key="gold")[0]
    assert keyed["gold"] == "72" and keyed["input"].startswith("Natalia") and "prompt" not in keyed
    assert apply_adapter([NATALIA], "") == [NATALIA]


def test_adapter_rejects_rows_naming_them():
    with pytest.raises(ValueError, match=r"adapter 'gsm8k': row 1: answer has no '#### <number>' line"):
        apply_adapter([NATALIA, {"question": "q", "answer": "72"}], "gsm8k")
    with pytest.raises(ValueError, match="row 0: 'question'"):
        apply_adapter([{"prompt": "q", "answer": "#### 1"}], "gsm8k")
    with pytest.raises(KeyError, match="unknown dataset adapter 'gsm9k'; known: .*gsm8k"):
        apply_adapter([NATALIA], "gsm9k")


@pytest.mark.parametrize("kind", ["attribute", "index"])
def test_an_adapter_that_fails_on_a_row_is_named_with_the_row(kind):
    """An adapter's AttributeError (``None.strip()`` on a missing field) or IndexError came through bare, naming
    neither the row nor the adapter: at submit a traceback instead of the key, in the trainer no row to look at."""
    from areal_hpc.config.schema import DatasetConfig
    from areal_hpc.launch.resolve import check_row

    @register_adapter("test-fragile")
    def fragile(row):
        title = row.get("title").strip() if kind == "attribute" else row["choices"][0]
        return {"prompt": title, "answer": "1"}

    good, bad = {"title": " t ", "choices": ["c"]}, {"choices": []}
    try:
        with pytest.raises(ValueError, match="adapter 'test-fragile': row 1: "):
            apply_adapter([good, bad], "test-fragile")
        with pytest.raises(ConfigError, match="train_dataset.adapter.*'test-fragile' cannot map line 2"):
            check_row("train_dataset", DatasetConfig(adapter="test-fragile"), bad, "line 2")
    finally:
        ADAPTERS.pop("test-fragile")


def test_users_register_adapters():
    @register_adapter("test-upper")
    def upper(row):
        return {"prompt": row["text"].upper(), "answer": row["label"]}

    try:
        assert apply_adapter([{"text": "abc", "label": "1"}], "test-upper") == [{"prompt": "ABC", "answer": "1"}]
    finally:
        ADAPTERS.pop("test-upper")


def test_builtin_adapter_names_match_the_config_check():
    assert set(DATASET_ADAPTERS) <= set(ADAPTERS)


@pytest.mark.parametrize("completion, reward", [
    ("48/2 = 24, 48 + 24 = 72. The answer is \\boxed{72}.", 1.0),
    ("So she sold \\boxed{72} clips", 1.0),
    ("$\\boxed{72}$", 1.0),
    ("\\boxed{72.0}", 1.0),
    ("She sold 72 clips in total, so \\boxed{24}", 0.0),   # the box is the answer, not another number
    ("\\boxed{73}", 0.0),
    # without a box math-verify falls back to the last number in the completion
    ("The answer is 72", 1.0),
    ("72 clips, not 24", 0.0),
    ("I do not know", 0.0),
    ("", 0.0),
])
def test_math_reward_on_gsm8k_answers(completion, reward):
    row = apply_adapter([NATALIA], "gsm8k")[0]
    assert get_reward("math")(row["prompt"], completion, row["answer"]) == reward


def test_math_reward_thousands():
    big = apply_adapter([{"question": "q", "answer": "#### 1,000"}], "gsm8k")[0]["answer"]
    math = get_reward("math")
    assert math("q", "\\boxed{1,000}", big) == 1.0 and math("q", "\\boxed{1000}", big) == 1.0


def test_math_reward_off_the_main_thread():
    """The rollout controller scores on its own thread, where math-verify cannot use signal.alarm."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(get_reward("math"), "q", "so \\boxed{72}", "72").result() == 1.0
        assert pool.submit(get_reward("math"), "q", "so \\boxed{71}", "72").result() == 0.0


def _validate(tmp_path, *overrides):
    cfg = load_config(None, ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                             f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0", *overrides])
    validate(cfg)
    return cfg


def test_config_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train_dataset.adapter.*'gsm9k' is not one of gsm8k") as e:
        _validate(tmp_path, "train_dataset.adapter=gsm9k")
    assert "gsm8k" in str(e.value.hint)
    with pytest.raises(ConfigError, match="valid_dataset.chat_template.*'raw' is not one of auto, none"):
        _validate(tmp_path, "valid_dataset.chat_template=raw")
    cfg = _validate(tmp_path, "train_dataset.adapter=gsm8k", "train_dataset.chat_template=none")
    assert cfg.train_dataset.adapter == "gsm8k"
    plugin = tmp_path / "my_adapter.py"
    plugin.write_text("")
    _validate(tmp_path, "train_dataset.adapter=mine", f"trainer.plugins=[{plugin}]")  # a plugin may register it


def test_shipped_config_reads_gsm8k_by_name():
    cfg = load_config(str(REPO / "configs" / "gsm8k-grpo.yaml"), [])
    for ds, split in ((cfg.train_dataset, "train"), (cfg.valid_dataset, "test")):
        assert (ds.path, ds.name, ds.split, ds.adapter, ds.chat_template) == ("openai/gsm8k", "main", split, "gsm8k",
                                                                             "auto")
    assert cfg.rollout.reward_fn == "math"


def test_gsm8k_ppo_end_to_end(tmp_path):
    """A few PPO steps on GSM8K-shaped rows through the adapter, the chat template and math-verify.
    The model is steered to answer "\\boxed{7}<|im_end|>" (see tests/chatml.py), so the rows whose
    answer is 7 score 1 and the others 0: with one epoch per step (8 rows, batch 8, staleness 0)
    every step's mean reward is exactly the share of 7s, and every completion ends at <|im_end|>."""
    model = build_chatml_model(tmp_path / "model", steer=BOXED_SEVEN)
    data = tmp_path / "gsm8k-train.jsonl"
    answers = ["7", "3", "7", "1,234", "7", "12", "7", "-7"]
    data.write_text("".join(json.dumps({"question": f"Question {i}: how many apples?",
                                        "answer": f"Some reasoning <<{i}+0={i}>>.\n#### {a}"}) + "\n"
                            for i, a in enumerate(answers)))
    cmd = [sys.executable, "-m", "areal_hpc", "submit", str(REPO / "configs" / "quickstart.yaml"),
           f"cluster.fileroot={tmp_path}", "stats.progress_bar=False", "experiment_name=gsm8k",
           f"trainer.ppo.actor.path={model}", f"train_dataset.path={data}", "train_dataset.adapter=gsm8k",
           "rollout.reward_fn=math", "rollout.batch_size=8", "rollout.n_samples=2", "rollout.max_head_offpolicyness=0",
           "rollout.gen.max_new_tokens=24", "trainer.total_train_steps=3", "saver.freq_steps=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rd = next(tmp_path.glob("*/gsm8k/run0"), None)
    logs = "".join(f"\n--- {f}\n" + f.read_text()[-3000:] for f in sorted((rd / "logs").glob("*"))) if rd else ""
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}{logs}"
    rows = read_metrics(rd / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["reward_mean"] == 0.5 for r in rows), [r["reward_mean"] for r in rows]
    assert all(r["completion_len_mean"] == len("\\boxed{7}") + 1 for r in rows)  # the reply and <|im_end|>


def test_gsm8k_eval_only(tmp_path):
    """trainer.type=null on a GSM8K-shaped valid set, with a system prompt: the adapter, the template
    and math-verify give the steered model's exact accuracy."""
    model = build_chatml_model(tmp_path / "model", steer=BOXED_SEVEN)
    data = tmp_path / "gsm8k-test.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"#### {a}"}) + "\n"
                            for i, a in enumerate(["7", "8", "7", "70"])))
    cmd = [sys.executable, "-m", "areal_hpc", "submit", str(REPO / "configs" / "quickstart.yaml"),
           f"cluster.fileroot={tmp_path}", "stats.progress_bar=False", "experiment_name=ev", "trainer.type=null",
           "allocation_mode=hf:d1+eval", f"server.model_path={model}", f"valid_dataset.path={data}",
           "valid_dataset.adapter=gsm8k", "valid_dataset.system_prompt=Answer in a box.", "rollout.reward_fn=math",
           "rollout.n_samples=2", "rollout.gen.max_new_tokens=24"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rd = next(tmp_path.glob("*/ev/run0"))
    report = json.loads((rd / "eval.json").read_text())
    assert report["n_prompts"] == 4 and report["accuracy"] == 0.5 and report["completion_len_mean"] == 10
    samples = [json.loads(line) for line in (rd / "eval_samples.jsonl").read_text().splitlines()]
    assert {s["completion"] for s in samples} == {"\\boxed{7}"}
    assert sorted({s["answer"] for s in samples}) == ["7", "70", "8"] and "\\boxed{}" in samples[0]["prompt"]
