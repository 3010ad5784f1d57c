"""Datasets by file, by local dataset directory laid out as on the Hub (configs + splits), with
`name` and `split`, through `datasets.load_dataset`; and the errors that name what is wrong."""

import json
from pathlib import Path

import pytest

from areal_hpc.config.schema import DatasetConfig
from areal_hpc.rollout.data import (DatasetError, PromptLoader, choose_split, dataset_splits, head_rows,
                                    iter_json_rows, load_dataset_rows, load_rows)

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
# A GSM8K-shaped dataset
"""


def gsm8k_rows(config: str, split: str, n: int):
    return [{"question": f"{config} {split} question {i}", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SIZES = {("main", "train"): 12, ("main", "test"): 5, ("socratic", "train"): 7, ("socratic", "test"): 3}


def make_hub_dataset(root: Path, fmt: str = "parquet", empty: tuple = ()) -> Path:
    """The layout of openai/gsm8k on the Hub: a README with two configs, train and test in each,
    as parquet (like the real one) or JSON Lines; the (config, split) pairs in ``empty`` hold no rows."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(README)
    write = write_parquet if fmt == "parquet" else write_jsonl
    for (config, split), n in SIZES.items():
        write(root / config / f"{split}-00000-of-00001.{fmt}", gsm8k_rows(config, split, 0 if (config, split) in empty
                                                                           else n))
    return root


@pytest.fixture(scope="module", params=["parquet", "jsonl"])
def hub_dir(request, tmp_path_factory):
    return make_hub_dataset(tmp_path_factory.mktemp("ds") / "gsm8k", request.param)


def test_hub_layout_by_name_and_split(hub_dir):
    assert sorted(dataset_splits(str(hub_dir), "main")) == ["test", "train"]
    train = load_rows(str(hub_dir), name="main", split="train")
    assert len(train) == 12 and train[0] == gsm8k_rows("main", "train", 1)[0]
    assert [r["question"] for r in load_rows(str(hub_dir), name="socratic", split="test")] == \
        [r["question"] for r in gsm8k_rows("socratic", "test", 3)]
    assert len(load_rows(str(hub_dir), name="main", split="train", limit=4)) == 4
    # No split given: train for training data, test (or validation...) for validation data.
    assert load_rows(str(hub_dir), name="socratic")[0]["question"] == "socratic train question 0"
    assert load_rows(str(hub_dir), name="socratic", which="valid")[0]["question"] == "socratic test question 0"
    assert head_rows(str(hub_dir), 2, name="main", which="valid") == gsm8k_rows("main", "test", 2)


def test_dataset_config_rows(hub_dir, tmp_path):
    ds = DatasetConfig(path=str(hub_dir), name="main", split="test", limit=3)
    assert [r["question"] for r in load_dataset_rows(ds, "valid")] == [f"main test question {i}" for i in range(3)]
    assert len(load_dataset_rows(DatasetConfig(path="toy:sum-16"), "train")) == 16  # toy specs untouched
    f = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 5)
    # A single file is the split, whatever `split` and `name` say.
    assert len(load_dataset_rows(DatasetConfig(path=str(f), name="main", split="test"), "valid")) == 5


def test_flat_directory_and_data_dir_layouts(tmp_path):
    flat = tmp_path / "flat"
    write_jsonl(flat / "part-a.jsonl", [{"prompt": "a", "answer": "1"}] * 2)
    write_jsonl(flat / "part-b.jsonl", [{"prompt": "b", "answer": "2"}] * 3)
    assert len(load_rows(str(flat))) == 5  # as before: every file of a plain directory
    hub = tmp_path / "hub"  # no README: splits from the file names (data/train-*, data/test-*)
    write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", [{"prompt": "t", "answer": "1"}] * 4)
    write_jsonl(hub / "data" / "test-00000-of-00001.jsonl", [{"prompt": "v", "answer": "2"}] * 2)
    assert [r["prompt"] for r in load_rows(str(hub))] == ["t"] * 4
    assert [r["prompt"] for r in load_rows(str(hub), which="valid")] == ["v"] * 2


def test_a_directory_without_datasets_keeps_its_splits_apart(tmp_path, monkeypatch):
    """Without `datasets` (bare GPU images) every .jsonl file of a directory was read: train and test mixed."""
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` raises ImportError
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t", "answer": "1"}] * 3)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "v", "answer": "2"}] * 2)
    assert [r["prompt"] for r in load_rows(str(tmp_path))] == ["t"] * 3
    assert [r["prompt"] for r in load_rows(str(tmp_path), which="valid")] == ["v"] * 2
    assert [r["prompt"] for r in load_rows(str(tmp_path), split="test", limit=1)] == ["v"]
    flat = tmp_path / "flat"  # no split in the names: one train split, as `datasets` reads it
    write_jsonl(flat / "part-a.jsonl", [{"prompt": "a", "answer": "1"}] * 2)
    write_jsonl(flat / "part-b.jsonl", [{"prompt": "b", "answer": "2"}] * 3)
    assert len(load_rows(str(flat))) == 5
    with pytest.raises(DatasetError, match="no split 'dev'"):
        load_rows(str(tmp_path), split="dev")


@pytest.mark.parametrize("kwargs, field, text", [
    ({"name": "nope"}, "name", "'nope' is not a config of"),
    ({}, "name", "has several configs (main, socratic)"),
    ({"name": "main", "split": "validation"}, "split", "no split 'validation'"),
])
def test_bad_name_or_split(hub_dir, kwargs, field, text):
    with pytest.raises(DatasetError) as e:
        load_rows(str(hub_dir), **kwargs)
    assert e.value.field == field and text in str(e.value), str(e.value)


def test_choose_split():
    assert choose_split(["train", "validation"], which="valid") == "validation"
    assert choose_split(["only"], which="valid") == "only"
    with pytest.raises(DatasetError, match=r"no test/validation/valid/eval/dev split .*splits: train, extra"):
        choose_split(["train", "extra"], which="valid")
    # `datasets`' slice syntax (AReaL passes split to load_dataset): said only "set it to one of them"
    with pytest.raises(DatasetError, match=r"no split 'train\[:100\]'.*set split=train and limit=100"):
        choose_split(["train", "test"], "train[:100]")


def test_empty_directory_and_empty_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no data files") as e:
        dataset_splits(str(tmp_path / "empty"))
    assert e.value.field == "path"
    hub = make_hub_dataset(tmp_path / "gsm8k", "jsonl", empty=[("socratic", "test")])
    assert load_rows(str(hub), name="socratic", split="test") == []
    assert head_rows(str(hub), 4, name="socratic", split="test") == []


def test_json_lines_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n{"prompt": "c", answer}\n')
    rows = iter_json_rows(str(bad))
    assert next(rows) == (1, {"prompt": "a", "answer": "1"}) and next(rows)[0] == 3
    with pytest.raises(DatasetError, match=rf"{bad} line 4 is not valid JSON"):
        next(rows)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "a", "answer": "1"}\n\x89PNG\r\n\x1a\n\xff\xfe')
    with pytest.raises(DatasetError, match=rf"{binary} line 2 is not UTF-8"):
        list(iter_json_rows(str(binary)))
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([{"prompt": "a", "answer": "1"}, ["not", "a", "row"]]))
    with pytest.raises(DatasetError, match="element 1 is a list"):
        list(iter_json_rows(str(arr)))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"prompt": "a", "answer": "1"}\n42\n')
    with pytest.raises(DatasetError, match="line 2 is a JSON int, not an object"):
        list(iter_json_rows(str(scalar)))


def test_a_data_file_that_cannot_be_read_is_bad_input(tmp_path, monkeypatch, capsys):
    """A .jsonl the user may not read ended `submit` with a PermissionError traceback (resolve reads every line)."""
    from areal_hpc.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    read_bytes = Path.read_bytes

    def denied(self):
        if self.suffix == ".jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["submit", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"), "--dry-run",
                 f"cluster.fileroot={tmp_path}", f"train_dataset.path={data}"]) == 2
    assert capsys.readouterr().err.endswith(f"train_dataset.path: {data} cannot be read: Permission denied "
                                            "(check its permissions)\n")


def test_alike_directories_do_not_share_a_cache_entry(tmp_path):
    """`datasets` keys its cache for a directory by its name and layout only; we read a directory's
    split as data files, so two directories named alike (or a file rewritten) give their own rows."""
    a = make_hub_dataset(tmp_path / "a" / "gsm8k", "jsonl")
    b = make_hub_dataset(tmp_path / "b" / "gsm8k", "jsonl", empty=[("main", "test")])
    write_jsonl(b / "main" / "test-00000-of-00001.jsonl", [{"question": "only b", "answer": "#### 1"}])
    assert len(load_rows(str(a), name="main", split="test")) == SIZES[("main", "test")]
    assert load_rows(str(b), name="main", split="test") == [{"question": "only b", "answer": "#### 1"}]
    write_jsonl(a / "main" / "test-00000-of-00001.jsonl", [{"question": "rewritten", "answer": "#### 2"}])
    assert load_rows(str(a), name="main", split="test") == [{"question": "rewritten", "answer": "#### 2"}]


def test_a_prompt_loader_past_its_last_epoch_stays_exhausted():
    """After its last epoch a loader yields nothing more, also when a recovered trainer resumes it from there."""
    rows = [{"i": i} for i in range(20)]
    done = PromptLoader(rows, seed=3, epochs=2)
    assert len(list(done)) == 40 and list(done) == []
    again = PromptLoader(rows, seed=3, epochs=2)
    again.load_state_dict(done.state_dict())
    assert list(again) == []


# fix8-C
def test_ppo_leaves_out_prompts_longer_than_max_prompt_len(tmp_path, caplog):
    """The tokenizer is character-level: a prompt of n characters is n tokens."""
    import logging
    from types import SimpleNamespace

    from chatml import build_chatml_tokenizer

    from areal_hpc.config.schema import ExperimentConfig
    from areal_hpc.trainers.rollout_side import load_prompts

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ("1+0=", "10+0=", "100+0=")))
    cfg = ExperimentConfig(train_dataset=DatasetConfig(path=str(f), max_prompt_len=5, shuffle=False))
    tok = build_chatml_tokenizer(tmp_path / "tok", template=None)
    with caplog.at_level(logging.WARNING):
        loader = load_prompts(SimpleNamespace(cfg=cfg), "train", epochs=1, tokenizer=tok)
    assert [r["prompt"] for r in loader] == ["1+0=", "10+0="]
    assert "1 of 3 prompts are longer than train_dataset.max_prompt_len=5 tokens" in caplog.text
    assert len(list(load_prompts(SimpleNamespace(cfg=cfg), "train", epochs=1))) == 3  # SFT keeps (and truncates)
    cfg.train_dataset.max_prompt_len = 3  # none fits: say so, not "the dataset is empty"
    with pytest.raises(DatasetError, match="all 3 prompts are longer than train_dataset.max_prompt_len=3") as e:
        load_prompts(SimpleNamespace(cfg=cfg), "train", epochs=1, tokenizer=tok)
    assert e.value.key == "train_dataset.max_prompt_len"  # the run's error line said `error: max_prompt_len: ...`


def test_rows_the_prompt_encoder_rejects_are_left_out_not_trained_on(tmp_path, caplog):
    """A row the encoder rejects (here: messages only, and a tokenizer without a chat template) was kept, and failed
    later: its PPO episode, or the SFT step that drew it. It is left out with one warning; none left is an error."""
    import logging
    from types import SimpleNamespace

    from chatml import build_chatml_tokenizer

    from areal_hpc.config.schema import ExperimentConfig
    from areal_hpc.trainers.rollout_side import load_prompts

    f = tmp_path / "rows.jsonl"
    messages = {"messages": [{"role": "user", "content": "1+1="}], "answer": "2"}
    f.write_text("".join(json.dumps(r) + "\n" for r in ({"prompt": "1+0=", "answer": "1"}, messages, messages)))
    cfg = ExperimentConfig(train_dataset=DatasetConfig(path=str(f), shuffle=False))
    tok = build_chatml_tokenizer(tmp_path / "tok", template=None)
    with caplog.at_level(logging.WARNING):
        loader = load_prompts(SimpleNamespace(cfg=cfg), "train", epochs=1, tokenizer=tok)
    assert [r["prompt"] for r in loader] == ["1+0="]
    warned = "2 of 3 rows of train_dataset cannot be encoded as prompts: left out (first: row has 'messages' but no"
    assert warned in caplog.text, caplog.text
    f.write_text(json.dumps(messages) + "\n")
    with pytest.raises(DatasetError, match="none of the 1 rows of train_dataset gives a usable prompt: 1 cannot be") \
            as e:
        load_prompts(SimpleNamespace(cfg=cfg), "train", epochs=1, tokenizer=tok)
    assert e.value.key == "train_dataset.path"  # was `path`
