"""Weight broadcast: a trainer process sends, a receiver process gets identical tensors (gloo, CPU)."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch

from areal_hpc import toy
from areal_hpc.registry import free_port
from areal_hpc.train.weight_sync import TensorSpec, announcement, plan_buckets
from ranks import receive_weights, run_ranks


def test_plan_buckets_keeps_order_and_budget():
    specs = [TensorSpec(f"w{i}", "float32", (10, 10)) for i in range(7)]  # 400 bytes each
    buckets = plan_buckets(specs, bucket_bytes=1000)
    assert [announcement(b)[0] for b in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4", "w5"], ["w6"]]
    assert announcement(plan_buckets(specs[:1], bucket_bytes=10)[0])[0] == ["w0"]  # oversize: alone
    assert announcement(specs[:2])[1:] == (["float32"] * 2, [[10, 10], [10, 10]])


def _worker(rank, path, group_port, side_port):
    # two independent programs: a 1-rank trainer and a receiver (no shared default group)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    import torch.distributed as tdist

    from areal_hpc.train.weight_sync import broadcast_engine_weights, init_weight_sync_group, new_group_name

    # the side channel stands in for the servers' HTTP endpoint: names/dtypes/shapes per bucket
    side = tdist.TCPStore("127.0.0.1", side_port, 2, is_master=(rank == 0), timeout=datetime.timedelta(seconds=60))
    if rank == 0:
        from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
        from areal_hpc.train.engine import FSDPEngine

        eng = FSDPEngine(EngineConfig(path=path), MicroBatchSpec(), total_steps=1)
        for round_, dtype in enumerate([torch.float32, torch.bfloat16]):
            name = new_group_name()
            side.set(f"group{round_}", name)
            group = init_weight_sync_group("127.0.0.1", group_port, 0, 2, name, backend="gloo", timeout_s=60)
            sent = []

            def announce(bucket, round_=round_):
                side.set(f"r{round_}b{len(sent)}", json.dumps(announcement(bucket)))
                sent.append(bucket)
                return lambda: side.get(f"r{round_}ack{len(sent) - 1}")  # wait for the receiver

            n = broadcast_engine_weights(eng, group, on_bucket=announce, bucket_bytes=20_000, dtype=dtype)
            side.set(f"r{round_}n", str(n))
            assert n == len(sent) > 2
            tdist.destroy_process_group(group)
            with torch.no_grad():  # a "training step" between the two rounds
                for p in eng.model.parameters():
                    p.mul_(2.0)
        side.get("done")
    else:
        from transformers import AutoModelForCausalLM

        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        for round_, dtype in enumerate([torch.float32, torch.bfloat16]):
            name = side.get(f"group{round_}").decode()
            group = init_weight_sync_group("127.0.0.1", group_port, 1, 2, name, backend="gloo", timeout_s=60)
            got = {}
            b = 0
            while True:
                key, done = f"r{round_}b{b}", f"r{round_}n"
                while not side.check([key]) and not side.check([done]):
                    time.sleep(0.01)
                if side.check([done]) and not side.check([key]):
                    assert b == int(side.get(done))
                    break
                names, dtypes, shapes = json.loads(side.get(key))
                got.update(receive_weights(group, names, dtypes, shapes))
                side.set(f"r{round_}ack{b}", "ok")
                b += 1
            tdist.destroy_process_group(group)
            assert "lm_head.weight" not in got  # tied to the embeddings
            assert set(got) == set(want) - {"lm_head.weight"}
            for k, v in got.items():
                expect = (want[k] * (2.0 ** round_)).to(dtype)
                assert v.dtype == dtype and torch.equal(v, expect), k
        side.set("done", "1")


def test_trainer_sends_receiver_gets_identical_tensors_and_rejoins(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_worker, 2, args=(path, free_port(), free_port()))


_SERVER = """
import asyncio, sys
sys.path.insert(0, sys.argv[4])
from areal_hpc.registry import Registry
from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner
from areal_hpc.inference.http_server import EngineServer
from helpers import engine_app
async def main(eng):
    async with engine_app(EngineServer(eng)) as url:
        Registry(sys.argv[2]).put("servers", sys.argv[3], {"address": url[7:], "state": "ready", "backend": "hf"},
                                ttl=False)  # a dead server's record outlives it (until its TTL)
        await asyncio.sleep(3600)
asyncio.run(main(LLMEngine(ModelRunner(sys.argv[1], max_running=4)).start()))
"""


def _server_dies_worker(rank, path, root):
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from areal_hpc.config import load_config
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.registry import Registry
    from areal_hpc.train.engine import FSDPEngine
    from areal_hpc.train.phases import PhaseTimer
    from areal_hpc.train.weight_sync import broadcast_engine_weights
    from areal_hpc.trainers.rollout_side import RolloutSide, load_prompts
    from areal_hpc.inference.client import ServerPool
    from areal_hpc.trainers import rollout_side

    rollout_side.GROUP_TIMEOUT_S = 120.0  # a group waiting for a server that never joins fails within the test
    reg, tests = Registry(Path(root) / "registry"), str(Path(__file__).parent)
    servers = [subprocess.Popen([sys.executable, "-c", _SERVER, path, str(reg.root), f"s{i}", tests]) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(reg.list("servers")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        cfg = load_config(str(Path(tests).parent / "configs" / "quickstart.yaml"), ["trainer.ppo.weight_update=gloo"])
        ctx = SimpleNamespace(cfg=cfg, registry=reg, weights_dir=Path(root) / "weights")
        tok = AutoTokenizer.from_pretrained(path)
        pool = ServerPool(reg, api_key="", refresh_s=3600)
        side = RolloutSide(ctx, tok, load_prompts(ctx, "train", epochs=1, tokenizer=tok), pool, 0, lambda: False)
        side.start()
        eng = FSDPEngine(EngineConfig(path=path), MicroBatchSpec(), total_steps=1)
        buckets = []

        def broadcast(group, on_bucket):
            def announce(bucket):
                buckets.append(bucket)
                if len(buckets) == 2:  # s1 dies between two buckets of the update
                    servers[1].kill()
                    servers[1].wait()
                return on_bucket(bucket)
            return broadcast_engine_weights(eng, group, announce, bucket_bytes=20_000)

        t0 = time.monotonic()
        try:
            side.update_weights_broadcast(broadcast, 1, PhaseTimer())
            raise AssertionError("the update did not fail")
        except RuntimeError as e:
            assert "Connection" in str(e) or "s1" in str(e), e
        # s0, left waiting for the rest of the update, was freed at once: /continue_generation reached it (3 tries of
        # a minute each timed out while the trainer kept the broken group)
        assert time.monotonic() - t0 < 60, time.monotonic() - t0
        # the next update leaves out s1, whose record is still there but which did not answer the pause
        out = side.update_weights_broadcast(lambda g, cb: broadcast_engine_weights(eng, g, cb), 2, PhaseTimer())
        assert out == {"servers_updated": 1.0} and side.members == ["s0"]
        side.stop_rest()
    finally:
        for s in servers:
            s.kill()


def test_a_server_dying_mid_broadcast_fails_the_update_at_once_and_frees_the_others(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_server_dies_worker, 1, args=(path, str(tmp_path)), env={"GLOO_SOCKET_IFNAME": "lo"})


def _moe_worker(rank, path, group_port, side_port):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    from safetensors.torch import load_file

    from areal_hpc.train.weight_sync import broadcast_engine_weights, init_weight_sync_group
    import torch.distributed as tdist

    side = tdist.TCPStore("127.0.0.1", side_port, 2, is_master=(rank == 0), timeout=datetime.timedelta(seconds=120))
    if rank == 0:
        from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
        from areal_hpc.train.engine import FSDPEngine

        eng = FSDPEngine(EngineConfig(path=path), MicroBatchSpec(), total_steps=1)
        group = init_weight_sync_group("127.0.0.1", group_port, 0, 2, "moe", backend="gloo", timeout_s=120)
        sent = []

        def announce(bucket):
            side.set(f"b{len(sent)}", json.dumps(announcement(bucket)))
            sent.append(bucket)
            return lambda: side.get(f"ack{len(sent) - 1}")

        side.set("n", str(broadcast_engine_weights(eng, group, announce, bucket_bytes=20_000, dtype=torch.float32)))
        # what SGLang's load_weights takes: the checkpoint's names (one per expert), as the disk copy has them
        assert {s.name for b in sent for s in b} == set(load_file(f"{path}/model.safetensors")) - {"lm_head.weight"}
        side.get("done")
    else:
        from areal_hpc.inference.hf_engine.model_runner import ModelRunner

        runner = ModelRunner(path, dtype="float32", max_running=2)
        group = init_weight_sync_group("127.0.0.1", group_port, 1, 2, "moe", backend="gloo", timeout_s=120)
        want = {k: v.clone() for k, v in runner.model.state_dict().items()}
        with torch.no_grad():
            for p in runner.model.parameters():
                p.zero_()
        b = 0
        while not side.check(["n"]) or b < int(side.get("n")):
            if not side.check([f"b{b}"]):
                time.sleep(0.01)
                continue
            names, dtypes, shapes = json.loads(side.get(f"b{b}"))
            specs = [(n, getattr(torch, d), tuple(s)) for n, d, s in zip(names, dtypes, shapes)]
            assert runner.check_weights([(n, s) for n, _, s in specs], whole=False) == []
            runner.load_broadcast(specs, group)
            side.set(f"ack{b}", "ok")
            b += 1
        got = runner.model.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        side.set("done", "1")


def test_a_moe_models_broadcast_sends_the_checkpoint_names_and_the_hf_server_loads_them(tmp_path):
    """transformers 5 holds a MoE layer's experts fused (``mlp.experts.gate_up_proj``); SGLang's
    /update_weights_from_distributed hands the names to the model's load_weights, which knows the checkpoint's
    (``mlp.experts.0.gate_proj.weight``). The broadcast sent the fused names (SGLang skips or fails on them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    toy.build_tokenizer(tmp_path / "moe")
    vocab = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                               tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    run_ranks(_moe_worker, 2, args=(str(tmp_path / "moe"), free_port(), free_port()))


def _moe_fused_worker(rank, a, b, group_port):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    from safetensors.torch import load_file
    from torch.utils._python_dispatch import TorchDispatchMode

    from areal_hpc.train.weight_sync import init_weight_sync_group, send_tensors

    sent = sorted(load_file(f"{b}/model.safetensors").items())  # checkpoint names: one tensor per expert
    group = init_weight_sync_group("127.0.0.1", group_port, rank, 2, "fused", backend="gloo", timeout_s=120)
    if rank == 0:
        for _ in range(2):
            send_tensors(group, [t for _, t in sent])
        send_tensors(group, [torch.zeros(1)])  # the receiver's "done": its store and group stay up until then
        torch.distributed.destroy_process_group(group)
        return
    from areal_hpc.inference.hf_engine.model_runner import ModelRunner

    class Made(TorchDispatchMode):  # every tensor an op makes while the broadcast is loaded
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    runner = ModelRunner(a, dtype="float32", max_running=2)
    fused = {n: p for n, p in runner._params.items() if "experts" in n}
    assert fused and all(n.endswith(("gate_up_proj", "down_proj")) for n in fused)
    before = {n: p.clone() for n, p in fused.items()}
    with Made():
        runner.load_broadcast([(n, t.dtype, tuple(t.shape)) for n, t in sent], group)
    # no element index of a fused parameter (one int64 per element) was built to place the experts
    assert not [t for t in Made.made if not t.is_floating_point() and t.numel() in {p.numel() for p in fused.values()}]
    # the fused parameters as the disk update of the same checkpoint has them (transformers' own conversion)
    disk = runner.read_weights(b)
    have = runner.model.state_dict()
    assert set(have) == set(disk) and all(torch.equal(have[k], disk[k]) for k in disk)
    assert not any(torch.equal(before[n], disk[n]) for n in fused)  # a's experts all replaced by b's
    # a conversion whose parts are no views (none in transformers' MoE layers yet) goes by the index, as before
    runner._views.update({k: None for k in runner._views if k.startswith("model.layers.1.")})
    with torch.no_grad():
        for p in fused.values():
            p.zero_()
    runner.load_broadcast([(n, t.dtype, tuple(t.shape)) for n, t in sent], group)
    assert all(torch.equal(have[k], disk[k]) for k in disk)
    send_tensors(group, [torch.zeros(1)])
    torch.distributed.destroy_process_group(group)


def test_a_moe_broadcast_places_each_expert_in_its_fused_parameter_without_an_index(tmp_path):
    """Each received expert (``mlp.experts.0.gate_proj.weight``) was copied into its fused parameter
    (``mlp.experts.gate_up_proj``) through an int64 index of every element of the parameter, 4x its bf16 size, held for
    the whole bucket (about 10 GB on the GPU for a 1 GiB bucket of Qwen3-30B-A3B). Each part is a strided view of its
    parameter, found once at start: the broadcast builds no index, and lands where transformers' disk load puts it."""
    pytest.importorskip("transformers.core_model_loading", reason="transformers 4 holds each expert apart")
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, seed in (("a", 0), ("b", 1)):
        toy.build_tokenizer(tmp_path / name)
        cfg = AutoConfig.for_model("qwen3_moe", vocab_size=len(toy.SPECIAL_TOKENS) + len(toy.CHARS), hidden_size=32,
                                   intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                                   num_experts_per_tok=2, tie_word_embeddings=True, pad_token_id=0)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / name)
    run_ranks(_moe_fused_worker, 2, args=(str(tmp_path / "a"), str(tmp_path / "b"), free_port()))
