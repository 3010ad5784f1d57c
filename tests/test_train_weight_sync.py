"""Weight broadcast: a trainer process sends, a receiver process gets identical tensors (gloo, CPU)."""

from __future__ import annotations

import datetime
import json
import os
import time

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
