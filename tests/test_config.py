"""Config loading: sources in order, dotted overrides, types, unknown keys with hints."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from areal_hpc.config import ConfigError, ExperimentConfig, dump_yaml, load_config, load_resolved, validate
from areal_hpc.config.validate import BUILT_IN, run_dir
from areal_hpc.inference.client import RequestRejected
from areal_hpc.rollout.data import DatasetError


def test_defaults_have_seed_names():
    c = ExperimentConfig()
    for key in ("experiment_name", "trial_name", "mode", "allocation_mode", "shutdown_server_on_exit",
                "min_required_servers"):
        assert hasattr(c, key)
    assert hasattr(c.trainer.ppo, "async_training")
    assert hasattr(c.trainer.sft.model, "path") and hasattr(c.trainer.sft, "mb_spec")
    assert hasattr(c.train_dataset, "path") and hasattr(c.valid_dataset, "path")
    for key in ("fileroot", "n_nodes", "n_gpus_per_node", "partition", "account", "time", "cpus_per_gpu",
                "mem_per_gpu_gb"):
        assert hasattr(c.cluster, key)


def test_sources_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"trial_name": "from-file",
                                 "trainer": {"ppo": {"eps_clip": 0.3, "async_training": False}},
                                 "rollout": {"batch_size": 7}}))
    c = load_config(str(f), ["trial_name=from-cli", "--rollout.n_samples", "3", "trainer.ppo.async_training=True"])
    assert c.trial_name == "from-cli"                  # override beats file
    assert c.trainer.ppo.eps_clip == 0.3               # file beats default
    assert c.rollout.batch_size == 7 and c.rollout.n_samples == 3
    assert c.trainer.ppo.async_training is True
    assert c.cluster.n_nodes == ExperimentConfig().cluster.n_nodes  # default kept


def test_types_lists_dicts_and_nulls():
    c = load_config(None, ["cluster.n_nodes=4", "rollout.gen.temperature=0.5",
                           "cluster.sbatch_args=[--exclusive, --x=1]",
                           "server.sglang_args.attention-backend=fa3", "server.sglang_args.cuda-graph-bs=[1, 2]",
                           "server.sglang_args.json-model-override-args={a: 1}", "trainer.ppo.c_clip=null",
                           "trainer.type=null", "--cluster.partition=gpu"])
    assert c.cluster.n_nodes == 4 and isinstance(c.cluster.n_nodes, int)
    assert c.rollout.gen.temperature == 0.5
    assert c.cluster.sbatch_args == ["--exclusive", "--x=1"]
    # a flag's scalar keeps its text; a list or mapping is YAML, as it is in the config file
    assert c.server.sglang_args == {"attention-backend": "fa3", "cuda-graph-bs": [1, 2],
                                    "json-model-override-args": {"a": 1}}
    assert c.trainer.ppo.c_clip is None and c.trainer.type is None
    assert c.cluster.partition == "gpu"


@pytest.mark.parametrize("overrides, key, words", [
    (["trainer.ppo.asyn_training=True"], "trainer.ppo.asyn_training", "did you mean 'trainer.ppo.async_training'"),
    (["exprimnt_name=x"], "exprimnt_name", "did you mean 'experiment_name'"),
    (["cluster.n_nodes=two"], "cluster.n_nodes", "invalid int"),
    (["rollout.gen.temperature=hot"], "rollout.gen.temperature", "invalid float"),
    (["trainer.ppo.async_training=maybe"], "trainer.ppo.async_training", "Boolean"),
    (["experiment_name=null"], "experiment_name", "must not be null"),
    # a section given a value was "unknown key (did you mean 'trainer.type' or 'trainer.ppo.kl_ctl'?)"
    (["trainer.ppo=null"], "trainer.ppo", "is a section, not a key (set its keys one by one, e.g. trainer.ppo.actor."),
])
def test_bad_overrides(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.key == key and words in str(e.value)


def test_bad_yaml_keys_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  ppo:\n    eps_clp: 0.2\n")
    with pytest.raises(ConfigError, match="trainer.ppo.eps_clp: unknown key.*eps_clip"):
        load_config(str(f), [])
    f.write_text("rollout:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match="rollout.batch_size: expected int"):
        load_config(str(f), [])
    # a dotted key (an override's spelling) in a file: "unknown key (did you mean 'trainer.ppo.eps_clip'?)" named it
    f.write_text("trainer:\n  ppo.eps_clip: 0.2\n")
    with pytest.raises(ConfigError, match=r"trainer.ppo.eps_clip: is one dotted key .*nest it .*ppo: \{eps_clip: "):
        load_config(str(f), [])
    f.write_text("cluster: 3\n")
    with pytest.raises(ConfigError, match="cluster: is a section"):
        load_config(str(f), [])


def test_words_name_the_file_and_layer_over_it(tmp_path):
    """The file comes from the words too; its nulls, numbers and mappings go through the same
    deserializer as the YAML-valued overrides, which add to its mappings and may null its values."""
    f = tmp_path / "c.yaml"
    f.write_text("trial_name: 1\ntrainer:\n  type: null\n  ppo:\n    actor:\n      optimizer:\n        lr: 1\n"
                 "server:\n  sglang_args:\n    a: x\ncluster:\n  partition: gpu\n")
    for words in ([str(f)], ["--config", str(f)], [f"config={f}"]):
        c = load_config(None, [*words, "server.sglang_args.b=y", "--cluster.partition", "null"])
        assert c.trial_name == "1" and c.trainer.type is None and c.cluster.partition is None
        assert c.trainer.ppo.actor.optimizer.lr == 1.0 and isinstance(c.trainer.ppo.actor.optimizer.lr, float)
        assert c.server.sglang_args == {"a": "x", "b": "y"}
    with pytest.raises(ConfigError, match="config: two config files"):
        load_config(str(f), ["--config", str(f)])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        load_config(None, [str(f), "stray"])


def test_a_value_after_its_option_may_hold_an_equals_sign():
    """`--cluster.setup_commands "export HF_HOME=/x"` was refused as "option needs a value": any next word with a '='
    was taken for the next key=value. Only a word that starts like a key is one."""
    c = load_config(None, ["--cluster.setup_commands", "export HF_HOME=/x", "--cluster.sbatch_args", "[--x=1]"])
    assert c.cluster.setup_commands == ["export HF_HOME=/x"] and c.cluster.sbatch_args == ["--x=1"]
    with pytest.raises(ConfigError, match="cluster.partition: option needs a value"):
        load_config(None, ["--cluster.partition", "trial_name=t1"])


def test_a_config_file_under_home(tmp_path, monkeypatch):
    """`--config=~/my.yaml` (bash expands no ~ after `--config=`) said "config: ~/my.yaml not found" of a file that
    is there; every other path of the config (fileroot, datasets, models, plugins) takes a ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my.yaml").write_text("trial_name: home\n")
    assert load_config(None, ["--config=~/my.yaml"]).trial_name == "home"


def test_a_config_file_that_cannot_be_read(tmp_path, monkeypatch, capsys):
    """A config file the user may not read (or in a directory they may not enter) was a PermissionError traceback."""
    from areal_hpc.cli.main import main

    (tmp_path / "c.yaml").write_text("seed: 1\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", denied)
    assert main(["submit", str(tmp_path / "c.yaml"), f"cluster.fileroot={tmp_path}"]) == 2
    assert capsys.readouterr().err.endswith("c.yaml cannot be read: Permission denied (check its permissions)\n")


def test_a_name_with_leading_zeros_keeps_them(tmp_path):
    """`trial_name: 01` in a config file is an octal 1 to YAML 1.1: the run went to .../1 (`010` to .../8), and
    `status trial_name=01` found no run. A number with a leading zero stays the text it is."""
    f = tmp_path / "c.yaml"
    f.write_text("trial_name: 01\nexperiment_name: 010\n")
    c = load_config(str(f), [])
    assert (c.trial_name, c.experiment_name) == ("01", "010")
    (tmp_path / "resolved.yaml").write_text(dump_yaml(c))
    assert load_resolved(tmp_path / "resolved.yaml").trial_name == "01"  # written quoted, read back as it was
    f.write_text("rollout:\n  batch_size: 010\n")  # not 8
    with pytest.raises(ConfigError, match="rollout.batch_size: expected int, got str '010'"):
        load_config(str(f), [])


def test_a_float_for_an_int_names_the_type_yaml_read(tmp_path):
    """`batch_size: 1e3` (or 32.0) for an int: the error said "got _Float 1000.0", the loader's own class."""
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  batch_size: 1e3\n")
    with pytest.raises(ConfigError, match=r"rollout.batch_size: expected int, got float 1000.0$"):
        load_config(str(f), [])
    with pytest.raises(ConfigError, match=r"rollout.gen.stop_token_ids\[0\]: expected int, got float 1.5$"):
        load_config(None, ["rollout.gen.stop_token_ids=[1.5]"])


def test_a_name_that_reads_as_a_float_keeps_its_text(tmp_path):
    """`trial_name: 1.10` was the run .../1.1: YAML reads a float, and its text is lost."""
    f = tmp_path / "c.yaml"
    f.write_text("trial_name: 1.10\nexperiment_name: 2.50e3\ncluster:\n  sbatch_args: [1.0]\n")
    c = load_config(str(f), [])
    assert (c.trial_name, c.experiment_name, c.cluster.sbatch_args) == ("1.10", "2.50e3", ["1.0"])
    (tmp_path / "resolved.yaml").write_text(dump_yaml(c))
    assert load_resolved(tmp_path / "resolved.yaml").trial_name == "1.10"
    f.write_text("rollout:\n  gen:\n    top_p: 0.50\n")
    assert load_config(str(f), []).rollout.gen.top_p == 0.5


def test_sglang_args_floats_reach_the_command_line_as_written(tmp_path):
    """`mem_fraction_static: 0.80` or a version-like `1.10` in `server.sglang_args` reached SGLang's command line as
    0.8 / 1.1 (a YAML float, in the file and again in the run dir's config.yaml). A flag's value is the user's text."""
    from areal_hpc.inference.sglang import build_sglang_options

    f = tmp_path / "c.yaml"
    f.write_text("server:\n  sglang_args:\n    mem-fraction-static: 0.80\n    x: 1.10\n    bs: [0.50, 2]\n"
                 "    json: {a: 1.50}\n    tp: 2\n    flag: true\n")
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(str(f), ["server.sglang_args.y=2.0"])))
    opts = build_sglang_options(load_resolved(tmp_path / "config.yaml").server, "m", host="h", port=1)
    assert [opts[k] for k in ("--mem-fraction-static", "--x", "--y", "--bs", "--json", "--tp", "--flag")] == [
        "0.80", "1.10", "2.0", ["0.50", "2"], '{"a": 1.5}', "2", None]


def test_a_null_flag_on_the_command_line_is_null():
    """`server.sglang_args.x=null` was the text "null" (the flag got the value null); in a file it is a bare flag."""
    c = load_config(None, ["server.sglang_args.x=null", "server.sglang_args.y=~", "server.sglang_args.z=nulls"])
    assert c.server.sglang_args == {"x": None, "y": None, "z": "nulls"}


def test_an_empty_value_empties_a_string_of_the_file(tmp_path):
    """`valid_dataset.path=` (a shell cannot pass '""') drops the file's eval set; YAML would read it as null."""
    f = tmp_path / "c.yaml"
    f.write_text("valid_dataset:\n  path: /data/test.jsonl\ncluster:\n  partition: gpu\n")
    c = load_config(str(f), ["valid_dataset.path=", "cluster.partition="])
    assert c.valid_dataset.path == "" and c.cluster.partition is None


def test_built_in_names_are_those_of_the_registries():
    """`validate` checks names against copies (config imports nothing above it): they must be the registries' own."""
    code = ("from areal_hpc import rollout; from areal_hpc.trainers import factory; print([sorted(t) for t in "
            "(factory.known_types(), rollout.WORKFLOWS, rollout.REWARDS, rollout.ADAPTERS)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([sorted(names) for names in BUILT_IN.values()])


def test_resolved_round_trip(tmp_path):
    c = load_config(None, ["trainer.ppo.c_clip=null", "server.sglang_args.x=1", "rollout.gen.stop_token_ids=[1,2]",
                           "trial_name=1e-5"])  # a string that reads as a number unquoted
    p = tmp_path / "config.yaml"
    p.write_text(dump_yaml(c))
    assert load_resolved(p) == c


def test_validate_normalises(tmp_path, monkeypatch):
    c = load_config(None, ["trainer.ppo.async_training=False", "rollout.max_head_offpolicyness=4",
                           "trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                           f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0"])
    validate(c)
    assert c.rollout.max_head_offpolicyness == 0  # sync training means staleness 0
    # cluster.python=~/venv/bin/python went into the job script as '~/venv/bin/python': no such file on the node
    c = load_config(None, ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                           f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0", "cluster.python=~/v/python"])
    validate(c)
    assert c.cluster.python == os.path.expanduser("~/v/python") and not c.cluster.python.startswith("~")
    # a relative fileroot stayed relative in {run}/config.yaml: given from another directory, it named another run
    monkeypatch.chdir(tmp_path)
    c = load_config(None, ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                           "cluster.fileroot=./runs", "cluster.n_gpus_per_node=0"])
    validate(c)
    assert c.cluster.fileroot == str(tmp_path / "runs")



@pytest.mark.parametrize("norm, ok", [("group", False), ("batch", True), ("none", True)])
def test_one_sample_a_prompt_with_group_advantages_is_refused(tmp_path, norm, ok):
    """A group of one sample is its own mean: with rollout.n_samples=1 and adv_norm=group every advantage was 0 and
    PPO trained on nothing, silently (rewards logged, weights unchanged); TRL's GRPO refuses num_generations < 2."""
    c = load_config(None, ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                           f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0", "rollout.n_samples=1",
                           f"trainer.ppo.adv_norm={norm}"])
    if ok:
        validate(c)
    else:
        with pytest.raises(ConfigError, match="every advantage") as e:
            validate(c)
        assert e.value.key == "rollout.n_samples"


@pytest.mark.parametrize("flag", ["port", "--host", "api_key", "model-path"])
def test_sglang_args_naming_a_flag_the_server_sets_are_refused_at_submit(tmp_path, flag):
    """SGLang would serve where the server step does not look (port, host), with another key or model: the step waited
    out launcher.server_startup_timeout_s on the cluster, after the queue. Refused at submit, naming the key to use."""
    c = load_config(None, ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                           f"cluster.fileroot={tmp_path}", "cluster.n_gpus_per_node=0",
                           f"server.sglang_args.{flag}=1"])
    with pytest.raises(ConfigError, match="sets itself") as e:
        validate(c)
    assert e.value.key == f"server.sglang_args.{flag}"


@pytest.mark.parametrize("e, fields", [
    (ConfigError("rollout.n", "must be >= 1", "set it to 1 or more"), ("key", "problem", "hint")),
    (DatasetError("split", "no split dev", "set it to one of them"), ("field", "message", "hint")),
    (RequestRejected(400, "token id 9999 is outside the vocabulary"), ("status", "message")),
], ids=["ConfigError", "DatasetError", "RequestRejected"])
def test_errors_with_several_fields_survive_pickling(e, fields):
    """A rollout process sends its error to the trainer pickled: it must come back whole, not as a TypeError."""
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and str(back) == str(e)
    assert [getattr(back, f) for f in fields] == [getattr(e, f) for f in fields]


def test_environment_variables_in_paths_of_a_config_file(tmp_path, monkeypatch):
    """`fileroot: $SCRATCH/areal` in a YAML file (no shell expands it there; our own hint says /scratch/$USER/areal)
    made the run dir `./$SCRATCH/areal/...` under the working directory, silently; `status` with the same file found
    it there too, so nothing ever said so. Paths take $VAR and ${VAR}; an unset one is an error naming the key."""
    monkeypatch.setenv("AREAL_TEST_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.delenv("AREAL_TEST_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "c.yaml"
    f.write_text("cluster:\n  fileroot: $AREAL_TEST_SCRATCH/areal\n  n_gpus_per_node: 0\n"
                 "trainer:\n  ppo:\n    actor:\n      path: ${AREAL_TEST_SCRATCH}/models/m\n"
                 "train_dataset:\n  path: $AREAL_TEST_SCRATCH/data/train.jsonl\n")
    c = load_config(str(f), [])
    assert c.trainer.ppo.actor.path == str(tmp_path / "scratch/models/m")
    assert c.train_dataset.path == str(tmp_path / "scratch/data/train.jsonl")
    validate(c)
    assert run_dir(c).is_relative_to(tmp_path / "scratch/areal")
    with pytest.raises(ConfigError, match=r"cluster.fileroot: .*\$AREAL_TEST_UNSET.* not set"):
        load_config(str(f), ["cluster.fileroot=$AREAL_TEST_UNSET/areal"])


def test_a_reference_to_another_key_in_a_path_is_named_as_such(tmp_path):
    """AReaL's YAML files point one key at another (`model_path: ${actor.path}`, OmegaConf). Written here as
    `${trainer.ppo.actor.path}`, the error said the environment variable $trainer was not set."""
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  model_path: ${trainer.ppo.actor.path}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f), [])
    assert e.value.key == "server.model_path" and "trainer.ppo.actor.path" in str(e.value)
    assert "$trainer" not in str(e.value) and "environment variable" not in str(e.value)


def test_chat_template_kwargs_keep_their_types_from_the_command_line_and_the_run_dir(tmp_path):
    """`{ds}.chat_template_kwargs` are the template's variables: `enable_thinking=false` is the bool false (Qwen3's
    template tests `enable_thinking is false`; the text "false" would leave thinking on), given whole or by entry, in
    the resolved config.yaml too. Not a mapping, or a key the prompt encoder passes itself: the key named, exit 2."""
    c = load_config(None, ["train_dataset.chat_template_kwargs.enable_thinking=false",
                           "train_dataset.chat_template_kwargs.budget=0.50",
                           "valid_dataset.chat_template_kwargs={enable_thinking: false, tools: [a]}"])
    assert c.train_dataset.chat_template_kwargs == {"enable_thinking": False, "budget": 0.5}
    assert c.valid_dataset.chat_template_kwargs == {"enable_thinking": False, "tools": ["a"]}
    (tmp_path / "config.yaml").write_text(dump_yaml(c))
    assert load_resolved(tmp_path / "config.yaml").train_dataset.chat_template_kwargs["enable_thinking"] is False
    with pytest.raises(ConfigError, match=r"^train_dataset.chat_template_kwargs: expected Dict"):
        load_config(None, ["train_dataset.chat_template_kwargs=true"])
    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    with pytest.raises(ConfigError, match=r"^train_dataset.chat_template_kwargs: 'tokenize' is no variable"):
        validate(load_config(quick, ["train_dataset.chat_template_kwargs={tokenize: true}"]))
