"""The allocation grammar: every accepted form, and malformed strings naming the bad token."""

import pytest

from areal_hpc.config import ConfigError, parse_allocation, validate_allocation
from areal_hpc.config.allocation import nodes_needed


@pytest.mark.parametrize("text, gen, train, eval_only", [
    ("sglang.d16p1m1+d32p1m1", ("sglang", 16, 1, 1), ("fsdp", 32, 1, 1), False),
    ("sglang.m2p1d4+d8", ("sglang", 4, 1, 2), ("fsdp", 8, 1, 1), False),      # letters in any order
    ("sglang.d4+d8p1m1", ("sglang", 4, 1, 1), ("fsdp", 8, 1, 1), False),
    ("sglang:d4t2+fsdp:d8", ("sglang", 4, 1, 2), ("fsdp", 8, 1, 1), False),
    ("sglang:t2d4+fsdp.d8", ("sglang", 4, 1, 2), ("fsdp", 8, 1, 1), False),
    ("sglang.d4p1m1", ("sglang", 4, 1, 1), None, False),
    ("sglang:d4", ("sglang", 4, 1, 1), None, False),
    ("sglang:d4+eval", ("sglang", 4, 1, 1), None, True),
    ("hf.d1p1m1+d1p1m1", ("hf", 1, 1, 1), ("fsdp", 1, 1, 1), False),
    ("hf:d2+fsdp:d2", ("hf", 2, 1, 1), ("fsdp", 2, 1, 1), False),
    ("hf.p1", ("hf", 1, 1, 1), None, False),                               # every letter optional
    ("sglang:d2p2t2+d4", ("sglang", 2, 2, 2), ("fsdp", 4, 1, 1), False),
    ("fsdp:d8", None, ("fsdp", 8, 1, 1), False),                          # trainer only (sft)
])
def test_accepted_forms(text, gen, train, eval_only):
    a = parse_allocation(text)
    assert (None if a.gen is None else (a.gen.backend, a.gen.dp, a.gen.pp, a.gen.tp)) == gen
    assert (None if a.train is None else (a.train.backend, a.train.dp, a.train.pp, a.train.tp)) == train
    assert a.eval_only == eval_only


@pytest.mark.parametrize("text, token", [
    ("", "empty"),
    ("   ", "empty"),
    ("sglang", "cannot parse 'sglang'"),
    ("sglang.", "empty parallelism"),
    ("sglang.d0", "d0"),
    ("sglang.d4x2", "unknown letter 'x'"),
    ("sglang.d4d2", "dp given twice"),
    ("sglang.m2t2", "tp given twice"),
    ("sglang.d4+", "empty component"),
    ("+d4", "empty component"),
    ("vllm:d4+fsdp:d4", "unknown generation backend 'vllm'"),
    ("fsdp:d4+sglang:d4", "put the servers first"),
    ("sglang:d4+megatron:d4", "unknown training backend 'megatron'"),
    ("sglang.d16p1m1+d32p2m1", "pipeline parallel p2"),
    ("sglang:d4+fsdp:d4t2", "tensor parallel t2"),
    ("hf:d2t2+fsdp:d4", "tensor parallel t2 in 'hf:d2t2' is not supported by hf"),  # one device a server
    ("hf.d1p2m1", "pipeline parallel p2"),
    ("sglang:d4|fsdp:d4", "colocation"),
    ("sglang:d4+fsdp:d4+fsdp:d4", "3 components"),
    ("SGLang:d4", "lower case"),
    ("sglang:d 4", "lower case without spaces"),
    ("sglang:4", "cannot parse '4'"),
    ("sglang:d4-", "cannot parse '-'"),
    ("sglang:d4+evaluation", "cannot parse"),
    ("sglang:dd4", "cannot parse"),
])
def test_malformed(text, token):
    with pytest.raises(ConfigError) as e:
        parse_allocation(text)
    assert e.value.key == "allocation_mode" and token in str(e.value)


def test_validate_against_cluster():
    validate_allocation(parse_allocation("sglang:d4t2+fsdp:d8"), 2, 8)
    assert nodes_needed(parse_allocation("sglang:d4t2+fsdp:d8"), 8) == 2
    assert nodes_needed(parse_allocation("sglang:d2+fsdp:d2"), 8) == 1
    with pytest.raises(ConfigError, match="needs 3 nodes"):
        validate_allocation(parse_allocation("sglang:d16+fsdp:d8"), 2, 8)
    with pytest.raises(ConfigError, match="tp\\*pp=16"):
        validate_allocation(parse_allocation("sglang:d1t16+fsdp:d8"), 4, 8)
    validate_allocation(parse_allocation("sglang:d1t16+fsdp:d8"), 3, 8, multi_node_tp=True)
    with pytest.raises(ConfigError, match="not a multiple"):
        validate_allocation(parse_allocation("sglang:d8+fsdp:d12"), 4, 8)
    validate_allocation(parse_allocation("hf:d64+fsdp:d64"), 1, 0)  # CPU-only: no GPU arithmetic


def test_sft_ignores_a_servers_part(tmp_path):
    """trainer.type=sft starts no servers (`launch.plan.has_servers`), so a servers part (the default
    allocation_mode's) is ignored by the checks too: its GPUs were counted against the cluster, its sglang
    refused on CPUs, for servers that never start."""
    from areal_hpc.config import load_config, validate

    base = ["trainer.type=sft", "trainer.sft.model.path=toy:qwen3", "train_dataset.path=toy:sum",
            f"cluster.fileroot={tmp_path}", "trainer.sft.batch_size=8"]
    cfg = load_config(None, base + ["allocation_mode=sglang:d16+fsdp:d8", "cluster.n_nodes=1",
                                    "cluster.n_gpus_per_node=8"])
    assert validate(cfg).train.world_size == 8  # one node holds the 8 trainer ranks: the 16 servers never start
    validate(load_config(None, base + ["allocation_mode=sglang:d1+fsdp:d1", "cluster.n_gpus_per_node=0"]))
    with pytest.raises(ConfigError, match="needs 2 nodes"):  # the trainer's own GPUs are still counted
        validate(load_config(None, base + ["allocation_mode=sglang:d1+fsdp:d16", "cluster.n_gpus_per_node=8"]))
