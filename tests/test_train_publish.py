"""Published weights load in transformers with the trainer's logprobs; pruning respects live servers."""

from __future__ import annotations

import torch

from areal_hpc import toy
from ranks import run_ranks

VOCAB = len(toy.SPECIAL_TOKENS) + len(toy.CHARS)  # ids 3.. are ordinary characters


def _loss(out, mb):
    m = mb["loss_mask"].float()
    return -(out["logprobs"] * m).sum() / m.sum().clamp(min=1), {}


def _worker(rank, path, root, reg_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.registry import Registry
    from areal_hpc.train.batching import collate
    from areal_hpc.train.engine import FSDPEngine
    from areal_hpc.train.publish import publish_weights

    eng = FSDPEngine(EngineConfig(path=path, optimizer=OptimizerConfig(lr=1e-2)), MicroBatchSpec(max_tokens_per_mb=32),
                     5)
    g = torch.Generator().manual_seed(3)
    batch = collate([{"input_ids": torch.randint(3, VOCAB, (n,), generator=g),
                      "loss_mask": torch.ones(n, dtype=torch.long)} for n in (7, 12, 20)])
    eng.train_batch(batch, _loss)  # weights now differ from the source model
    reg = Registry(reg_root)
    out = publish_weights(eng, root, 1, path, registry=reg if rank == 0 else None)
    assert out.exists()
    for temperature in (1.0, 0.7):
        mine = eng.forward(batch, temperature=temperature)
        if rank == 0:
            model = AutoModelForCausalLM.from_pretrained(str(out))
            assert model.dtype == torch.float32
            for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                ids = batch["input_ids"][i, :n]
                with torch.no_grad():
                    logits = model(input_ids=ids[None]).logits[0].float() / temperature
                ref = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)
                torch.testing.assert_close(mine[i, 1:n], ref, atol=1e-5, rtol=0)
    if rank == 0:
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.decode(tok("1+2=3")["input_ids"]) == "1+2=3"
        rec = reg.get("weights", "latest")
        assert (rec["version"], rec["path"]) == (1, str(out))
    for v in (2, 3):  # right after a no-grad forward (root and last layer still unsharded)
        publish_weights(eng, root, v, path, registry=reg if rank == 0 else None)
    if rank == 0:
        assert reg.get("weights", "latest")["version"] == 3
        from safetensors.torch import load_file

        a, b = load_file(f"{root}/v1/model.safetensors"), load_file(f"{root}/v3/model.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_publish_loads_in_transformers_with_same_logprobs(tmp_path):
    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    run_ranks(_worker, 2, args=(path, str(tmp_path / "weights"), str(tmp_path / "registry")))
    root = tmp_path / "weights"
    assert sorted(p.name for p in root.iterdir()) == [".static", "v1", "v2", "v3"]
    # config and tokenizer files are written once (.static) and linked into every version
    for name in ("config.json", "tokenizer.json"):
        assert len({(root / d / name).stat().st_ino for d in (".static", "v1", "v2", "v3")}) == 1


def _fake_versions(root, versions):
    for v in versions:
        (root / f"v{v}").mkdir(parents=True)
        (root / f"v{v}" / "model.safetensors").write_bytes(b"x")


def test_prune_keeps_what_live_servers_may_need(tmp_path):
    from areal_hpc.registry import Registry
    from areal_hpc.train.publish import published_versions, prune_weights

    root = tmp_path / "weights"
    _fake_versions(root, [1, 2, 3, 4, 5])
    reg = Registry(tmp_path / "registry")
    reg.put("weights", "latest", {"version": 5, "path": str(root / "v5")}, ttl=False)
    reg.put("servers", "a", {"weight_version": 3})
    reg.put("servers", "b", {"weight_version": 5})
    assert prune_weights(root, reg, keep_min_version=5) == [1, 2]  # server a is still on v3
    reg.delete("servers", "a")
    assert prune_weights(root, reg, keep_min_version=5) == [3, 4]
    assert sorted(published_versions(root)) == [5]
    # latest is kept even below keep_min_version; no registry: only the floor counts
    assert prune_weights(root, None, keep_min_version=9) == []
    _fake_versions(root, [6, 7])
    assert prune_weights(root, None, keep_min_version=7) == [5, 6]
    assert sorted(published_versions(root)) == [7]


# fix8-D
def test_prune_skips_a_server_whose_version_is_not_a_number(tmp_path):
    """An SGLang server attached before the first publish reports its own version ("default"): it needs no ``v{K}``,
    and the trainer's prune after the first weight update must not crash on it."""
    from areal_hpc.registry import Registry
    from areal_hpc.train.publish import prune_weights

    root = tmp_path / "weights"
    _fake_versions(root, [1, 2, 3])
    reg = Registry(tmp_path / "registry")
    reg.put("servers", "ext0", {"weight_version": "default"})
    reg.put("servers", "s0", {"weight_version": 2})
    assert prune_weights(root, reg, keep_min_version=3) == [1]


def test_prune_removes_what_a_crashed_writer_left(tmp_path):
    """A trainer killed while writing ``v{K}`` leaves ``.v{K}.<host>.<pid>.<n>.tmp`` (a whole model): the next trainer's
    prune removes it; a write of this process's own is left alone."""
    from areal_hpc.registry.util import temp_name
    from areal_hpc.train.publish import prune_weights

    root = tmp_path / "weights"
    _fake_versions(root, [4])
    torn, mine = root / ".v5.other-host.999999999.0.tmp", root / temp_name("v6")
    for d in (torn, mine):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    assert prune_weights(root, None, keep_min_version=4) == []
    assert not torn.exists() and mine.exists() and (root / "v4").exists()


def _moe_worker(rank, path, root):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from areal_hpc.config.schema import EngineConfig, MicroBatchSpec, OptimizerConfig
    from areal_hpc.train.batching import collate
    from areal_hpc.train.engine import FSDPEngine
    from areal_hpc.train.publish import publish_weights

    eng = FSDPEngine(EngineConfig(path=path, optimizer=OptimizerConfig(lr=1e-2)), MicroBatchSpec(max_tokens_per_mb=32),
                     5)
    g = torch.Generator().manual_seed(3)
    batch = collate([{"input_ids": torch.randint(3, VOCAB, (n,), generator=g),
                      "loss_mask": torch.ones(n, dtype=torch.long)} for n in (7, 12)])
    eng.train_batch(batch, _loss)
    out = publish_weights(eng, root, 1, path)
    mine = eng.forward(batch)
    if rank == 0:
        assert set(load_file(f"{out}/model.safetensors")) == set(load_file(f"{path}/model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(str(out))
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            ids = batch["input_ids"][i, :n]
            with torch.no_grad():
                ref = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)[:-1].gather(-1, ids[1:, None])
            torch.testing.assert_close(mine[i, 1:n], ref.squeeze(-1), atol=1e-5, rtol=0)


def test_a_moe_models_published_weights_keep_the_checkpoint_names(tmp_path):
    """transformers 5 holds a MoE layer's experts fused (``mlp.experts.gate_up_proj [E, 2I, H]``) where checkpoints
    name each expert (``mlp.experts.0.gate_proj.weight``): the published weights had the module's names, which
    SGLang's loader (disk or broadcast update) does not know. They are now written as ``save_pretrained`` writes
    them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    toy.build_tokenizer(tmp_path / "moe")
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                               tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    run_ranks(_moe_worker, 2, args=(str(tmp_path / "moe"), str(tmp_path / "weights")))
