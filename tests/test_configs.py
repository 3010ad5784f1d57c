"""The shipped configs: the placeholder paths are rejected clearly; with real paths, --dry-run
renders a sensible allocation (nodes, GPUs, one srun per server, one SPMD trainer step)."""

import json
from pathlib import Path

import pytest

from areal_hpc.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_placeholders_are_named(tmp_path, capsys):
    assert main(["submit", str(CONFIGS / "gsm8k-grpo.yaml"), f"cluster.fileroot={tmp_path}", "--dry-run"]) == 2
    assert "trainer.ppo.actor.path: model path '/path/to/Qwen2.5-1.5B-Instruct' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name, paths, servers, trainer_ranks, nodes", [
    ("gsm8k-grpo.yaml", ["trainer.ppo.actor.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum",
                         "valid_dataset.path=toy:sum"], 8, 8, 2),
    ("sft.yaml", ["trainer.sft.model.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum"], 0, 8, 1),
])
def test_dry_run_renders(tmp_path, name, paths, servers, trainer_ranks, nodes):
    assert main(["submit", str(CONFIGS / name), f"cluster.fileroot={tmp_path}", "cluster.partition=gpu",
                 *paths, "--dry-run"]) == 0
    rd = next(tmp_path.glob("*/*/t1"))
    plan = json.loads((rd / "plan.json").read_text())
    assert plan["nodes"] == nodes and plan["gpus_per_node"] == 8
    roles = [s["role"] for s in plan["steps"]]
    assert roles.count("server") == servers and roles.count("trainer") == 1
    trainer = plan["steps"][-1]
    assert trainer["ntasks"] == trainer_ranks and trainer["gpus_per_task"] == 1
    script = (rd / "sbatch" / "allocation.sbatch").read_text()
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --gres=gpu:8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --signal=" in script
    assert script.count("areal_hpc serve") == servers and script.count("areal_hpc train") == 1
    gpus = [(s["relative_node"], g) for s in plan["steps"] for g in s["gpu_ids"]]
    if servers:  # servers on node 0, trainer on node 1: no GPU shared
        assert {s["relative_node"] for s in plan["steps"] if s["role"] == "server"} == {0}
        assert trainer["relative_node"] == 1
    assert len(gpus) == len(set(gpus))
