"""GPU checks (run on a GPU machine; skipped elsewhere): FSDP2 over NCCL, NCCL weight sync."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import serve_argv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _n_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


FSDP_PROBE = r"""
import json, os, sys, torch
from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
from areal_hpc.train.engine import FSDPEngine
from areal_hpc.train.sft_loss import sft_loss, tokenize_rows
from areal_hpc.train.engine import loss_token_count
from areal_hpc.train.batching import shard_batch
from areal_hpc.toy import make_sum_rows
from transformers import AutoTokenizer
eng = FSDPEngine(EngineConfig(path=sys.argv[1], dtype="bfloat16", optimizer=OptimizerConfig(lr=1e-4)),
                 MicroBatchSpec(max_tokens_per_mb=4096), total_steps=10)
tok = AutoTokenizer.from_pretrained(eng.model_path)
batch = tokenize_rows(make_sum_rows(32, seed=3), tok)
losses = []
for _ in range(3):
    stats = eng.train_batch(shard_batch(batch, eng.info.rank, eng.info.world_size), sft_loss, loss_token_count)
    losses.append(stats["loss"])
if eng.info.rank == 0:
    print("RESULT " + json.dumps({"losses": losses, "grad_norm": stats["grad_norm"]}), flush=True)
"""


def _fsdp(n: int, model: str, tmp_path: Path) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(FSDP_PROBE)
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}", NCCL_CUMEM_ENABLE="0")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                        "--master_port", str(29500 + n), str(script), model], capture_output=True, text=True,
                       env=env, timeout=600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(line[len("RESULT "):])


def test_fsdp2_two_gpus_equals_one(tmp_path):
    if _n_gpus() < 2:
        pytest.skip("needs 2 GPUs")
    from areal_hpc import toy

    model = toy.resolve_model("toy:qwen3-h256-l4", cache_dir=tmp_path)
    one, two = _fsdp(1, model, tmp_path), _fsdp(2, model, tmp_path)
    for a, b in zip(one["losses"], two["losses"]):  # bf16 params, fp32 reduction
        assert abs(a - b) <= 2e-2 * max(1.0, abs(a)), (one, two)
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 5e-2 * max(1.0, one["grad_norm"]), (one, two)
    assert one["losses"][-1] < one["losses"][0]


def test_nccl_weight_sync_gives_server_the_trainer_weights(tmp_path, monkeypatch):
    """A real hf server on GPU 1 joins a weight group with a trainer engine on GPU 0; after a
    training step and a broadcast, the server's greedy logprobs equal the trainer's (bf16)."""
    if _n_gpus() < 2:
        pytest.skip("needs 2 GPUs")
    import asyncio

    import torch

    from areal_hpc import toy
    from areal_hpc.config.schema import EngineConfig, LauncherConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.inference.client import ServerPool
    from areal_hpc.registry import Registry
    from areal_hpc.train.engine import FSDPEngine, loss_token_count
    from areal_hpc.train.sft_loss import sft_loss, tokenize_rows
    from areal_hpc.train.weight_sync import (announcement, broadcast_engine_weights, init_weight_sync_group,
                                             new_group_name)

    model = toy.resolve_model("toy:qwen3-h256-l4", cache_dir=tmp_path)
    run = tmp_path / "run"
    reg = Registry.for_run(run)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               NCCL_CUMEM_ENABLE="0")
    server = subprocess.Popen(serve_argv(run, "s0", f"server.model_path={model}", "server.dtype=bfloat16"),
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        reg.wait_for("servers", 1, timeout_s=300, predicate=lambda r: r.get("state") == "ready")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        eng = FSDPEngine(EngineConfig(path=model, dtype="bfloat16", optimizer=OptimizerConfig(lr=1e-2)),
                         MicroBatchSpec(), total_steps=2)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        batch = tokenize_rows(toy.make_sum_rows(16), tok)
        eng.train_batch(batch, sft_loss, loss_token_count)  # weights now differ from the server's
        prompt = tok("3+4=", add_special_tokens=False)["input_ids"]

        async def scenario():
            pool = ServerPool(reg)
            await pool.start()
            await pool.wait_for_servers(1, 60)
            before = await pool.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})
            name = new_group_name()
            join = asyncio.create_task(pool.call_all("POST", "/init_weights_update_group", {
                "master_address": "127.0.0.1", "master_port": 29611, "rank_offset": 1, "world_size": 2,
                "backend": "nccl", "group_name": name}, timeout_s=300))
            group = await asyncio.to_thread(init_weight_sync_group, "127.0.0.1", 29611, 0, 2, name)
            assert all(r.ok for r in (await join).values())
            loop = asyncio.get_running_loop()

            def on_bucket(bucket):
                names, dtypes, shapes = announcement(bucket)
                fut = asyncio.run_coroutine_threadsafe(pool.call_all("POST", "/update_weights_from_distributed", {
                    "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": name,
                    "weight_version": "1"}, timeout_s=300), loop)
                return lambda: [r for r in fut.result(300).values() if not r.ok] == [] or pytest.fail("recv failed")

            t0 = time.monotonic()
            await asyncio.to_thread(broadcast_engine_weights, eng, group, on_bucket)
            sync_s = time.monotonic() - t0
            after = await pool.generate(prompt, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})
            await pool.close()
            return before, after, sync_s

        before, after, sync_s = asyncio.run(scenario())
        assert set(after.versions) == {1}
        ids = torch.tensor([prompt + after.output_ids])
        ref = eng.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)})[0, len(prompt):]
        got = torch.tensor(after.logprobs)
        assert torch.allclose(got, ref.float().cpu(), atol=5e-2), (got, ref)
        print(f"weight sync of toy model: {sync_s:.3f}s")
    finally:
        server.terminate()
        server.wait(30)


def test_compiled_varlen_engine_matches_eager_sdpa(tmp_path):
    """The flash varlen path as training runs it (grouped-query K/V heads, traced inside compiled
    decoder layers; micro-batches of any length, or padded to one length and compiled for it with
    sibling projections fused into one matmul) gives the logprobs, loss and gradient norm of eager
    SDPA on packed documents."""
    if _n_gpus() < 1:
        pytest.skip("needs a GPU")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec
    from areal_hpc.train import packed_attention
    from areal_hpc.train.batching import collate
    from areal_hpc.train.engine import FSDPEngine, grad_norm
    from areal_hpc.train.sft_loss import sft_loss

    cfg = AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 512, (n,), generator=g), "loss_mask": (torch.arange(n) > 0).long()}
               for n in (37, 300, 5, 129, 64, 2, 250)]
    batch = collate(samples)
    res = {}
    for name, kw in {"eager_sdpa": dict(attn_impl="sdpa"),
                     "compiled_varlen": dict(attn_impl="varlen", compile_layers=True, fuse_linears=False),
                     "compiled_padded_fused": dict(attn_impl="varlen", compile_layers=True, pad_micro_batches=True,
                                                   fuse_linears=True)}.items():
        eng = FSDPEngine(EngineConfig(path=str(tmp_path / "m"), dtype="bfloat16", **kw),
                         MicroBatchSpec(max_tokens_per_mb=256), total_steps=1)
        logp = eng.forward(batch)
        stats = eng.forward_backward(batch, sft_loss)
        res[name] = (logp, stats["loss"], float(grad_norm(list(eng.model.parameters()))))
        del eng
    assert packed_attention._state["flash"], "the flash varlen kernel did not run on this GPU"
    lp_ref, loss_ref, norm_ref = res["eager_sdpa"]
    for name in ("compiled_varlen", "compiled_padded_fused"):
        lp, loss, norm = res[name]
        assert (lp - lp_ref).abs().max() < 5e-2, (name, (lp - lp_ref).abs().max())
        assert abs(loss - loss_ref) < 1e-2 * abs(loss_ref), (name, loss, loss_ref)
        assert abs(norm - norm_ref) < 3e-2 * norm_ref, (name, norm, norm_ref)


def test_ppo_step_on_a_gpu_learns_from_uneven_groups(tmp_path):
    """The PPO step as the trainer runs it on one GPU (bf16, flash varlen, several micro-batches): a batch built by
    `trajectories_to_batch` from groups of unequal size (their ids ride along to the GPU), advantages per group, and
    the rewarded completions' logprobs rise."""
    if _n_gpus() < 1:
        pytest.skip("needs a GPU")
    import torch

    from areal_hpc import toy
    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig, PPOConfig
    from areal_hpc.rollout import Trajectory
    from areal_hpc.train.ppo_loss import PPOActor
    from areal_hpc.trainers.ppo_trainer import trajectories_to_batch

    path = toy.resolve_model("toy:qwen3-h128-l2", cache_dir=tmp_path)
    cfg = PPOConfig(actor=EngineConfig(path=path, dtype="bfloat16", attn_impl="varlen",
                                       optimizer=OptimizerConfig(lr=5e-3)),
                    mb_spec=MicroBatchSpec(max_tokens_per_mb=64), ppo_n_minibatches=2)
    actor = PPOActor.build(cfg, total_steps=10, group_size=4, temperature=1.0)
    g = torch.Generator().manual_seed(1)
    vocab = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)
    groups = []
    for size in (3, 5, 4, 6):  # a workflow may return more or fewer samples than group_size
        prompt = torch.randint(3, vocab, (8,), generator=g).tolist()
        groups.append([Trajectory(prompt, torch.randint(3, vocab, (6,), generator=g).tolist(), [0.0] * 6, [0] * 6,
                                  float(k == 0)) for k in range(size)])
    batch = trajectories_to_batch(groups)
    assert batch["group"].tolist() == [0] * 3 + [1] * 5 + [2] * 4 + [3] * 6
    batch["logprobs"] = actor.compute_logp(batch).cpu()  # behaviour = current policy
    mask, good = batch["loss_mask"].bool(), batch["rewards"].bool()

    def mean_logp(sel):
        return float(actor.compute_logp(batch).cpu()[sel][mask[sel]].mean())

    before_good, before_bad = mean_logp(good), mean_logp(~good)
    for _ in range(4):
        stats = actor.train_step(dict(batch))
        assert stats["n_mbs"] > 1 and all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert mean_logp(good) > before_good + 0.1 and mean_logp(~good) < before_bad - 0.1


def test_cuda_rng_state_of_a_checkpoint_restores_where_fewer_gpus_are_visible():
    """A checkpoint keeps the CUDA generator of the rank's own device, and the draws after a restore repeat. An earlier
    checkpoint holds one state per GPU the rank saw: resumed where it sees fewer (a run started with all of a node's
    GPUs visible, resumed with one a task), `set_rng_state_all` raised for the GPUs that are not there."""
    if _n_gpus() < 1:
        pytest.skip("needs a GPU")
    import torch

    from areal_hpc.train.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    drawn = torch.rand(8, device="cuda")
    set_rng_state(saved)
    assert torch.equal(torch.rand(8, device="cuda"), drawn)
    set_rng_state(dict(saved, cuda=[saved["cuda"]] * (_n_gpus() + 1)))
    assert torch.equal(torch.rand(8, device="cuda"), drawn)
