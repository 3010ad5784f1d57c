"""`parallel.compile_layers` on CPU (the engine compiles only on CUDA; the function is the same)."""

import pytest
import torch

pytestmark = pytest.mark.slow


def _packed_inputs(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, vocab, (1, int(cu[-1])), generator=g)
    m = max(lengths)
    return dict(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=m, max_length_k=m)


def assert_same_logits_and_grads(eager, compiled, x):
    a, b = eager(**x).logits, compiled(**x).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().mean(), list(eager.parameters()))
    gb = torch.autograd.grad(b.square().mean(), list(compiled.parameters()))
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_compiled_layers_match_eager_and_do_not_recompile_per_length(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from areal_hpc import toy
    from areal_hpc.train import packed_attention, parallel

    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    impl = packed_attention.resolve_impl("varlen")
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    compiled = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    parallel.compile_layers(compiled)
    vocab = eager.config.vocab_size
    torch._dynamo.reset()
    counters.clear()
    graphs_after_first = None
    # packed rows of different total lengths, then the 2-token dummy micro-batch shape
    for i, lengths in enumerate([[15, 25], [20, 13, 24], [7, 30, 9, 11], [2]]):
        x = _packed_inputs(lengths, vocab, seed=i)
        assert_same_logits_and_grads(eager, compiled, x)
        if i == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
            assert graphs_after_first > 0  # the layers really were compiled
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # dynamic lengths: no recompilation


def test_padded_rows_compile_static_token_count_and_settle(tmp_path):
    """``engine.pad_micro_batches``: rows of one length (a padding document at the end), compiled
    with automatic dynamic shapes and the row length as the longest document (as the engine passes
    it), give the eager results; after the first change of document count no further graphs are
    compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from areal_hpc import toy
    from areal_hpc.train import packed_attention, parallel

    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    impl = packed_attention.resolve_impl("varlen")
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    compiled = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    parallel.compile_layers(compiled, dynamic=None)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for i, lengths in enumerate([[15, 25, 24], [20, 13, 24, 7], [7, 30, 9, 11, 7], [9, 11, 40, 4], [64]]):
        x = dict(_packed_inputs(lengths, eager.config.vocab_size, seed=i), max_length_q=64, max_length_k=64)
        assert_same_logits_and_grads(eager, compiled, x)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] > graphs[0]  # static first, then the changed sizes symbolic
    assert graphs[-1] == graphs[1], graphs


def test_fused_sibling_linears_match_eager(tmp_path):
    """``engine.fuse_linears``: query/key/value (with biases, Qwen2) and gate/up projections fused
    into one matmul each give the eager logits and gradients."""
    import torch._inductor.config
    from transformers import AutoConfig, AutoModelForCausalLM

    from areal_hpc.train import packed_attention, parallel

    cfg = AutoConfig.for_model("qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    impl = packed_attention.resolve_impl("varlen")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation=impl)
    compiled = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation=impl)
    assert compiled.model.layers[0].self_attn.k_proj.bias is not None
    fuse = parallel.compile_layers(compiled, fuse_linears=True)
    for i, lengths in enumerate([[15, 25], [20, 13, 24]]):
        x = _packed_inputs(lengths, cfg.vocab_size, seed=i)
        with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip the pass
            assert_same_logits_and_grads(eager, compiled, x)
    assert fuse.fused >= 2  # q/k/v and gate/up of a layer (more: CPU attention splits the graph)


def test_fuse_sibling_linears_graph():
    """The pass on a plain graph: three linears of one input (with biases) become one, two of
    another input without biases another; a linear of a different input is left alone."""
    import torch.nn.functional as F

    from areal_hpc.train.parallel import fuse_sibling_linears

    def f(x, y, wq, bq, wk, bk, wv, bv, wg, wu, wo):
        q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
        h = F.silu(F.linear(y, wg)) * F.linear(y, wu)
        return q.sum(-1) + k.sum(-1) + v.sum(-1), F.linear(h, wo)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g) for s in
            [(2, 5, 8), (2, 5, 8), (8, 8), (8,), (4, 8), (4,), (4, 8), (4,), (6, 8), (6, 8), (8, 6)]]
    gm = torch.fx.symbolic_trace(f)
    want = gm(*args)
    for node, a in zip(gm.graph.find_nodes(op="placeholder"), args):
        node.meta["example_value"] = a
    assert fuse_sibling_linears(gm.graph) == 2
    gm.recompile()
    assert sum(n.target is F.linear or n.target is torch._C._nn.linear for n in gm.graph.nodes) == 3
    for got, ref in zip(gm(*args), want):
        torch.testing.assert_close(got, ref)


def test_compiled_head_kernels_match_eager_and_compile_once():
    """`logprob.compiled_call` of the LM-head chunk functions (what CUDA runs) gives the eager values
    for chunks of any row count, with one graph per function: only the row count is dynamic."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from areal_hpc.train import logprob

    torch._dynamo.reset()
    counters.clear()
    vocab = 1000
    for i, rows in enumerate([64, 37, 5, 2, 100]):
        g = torch.Generator().manual_seed(i)
        logits = (torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16)
        labels = torch.randint(0, vocab, (rows,), generator=g)
        eager = logprob._head_stats(logits, labels, 0.7, True)
        got = logprob.compiled_call(logprob._head_stats, logits, labels, 0.7, True)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        args = (logits, labels, eager[0], eager[2], torch.randn(rows, generator=g), torch.randn(rows, generator=g), 0.7)
        torch.testing.assert_close(logprob.compiled_call(logprob._head_grad, *args).float(),
                                   logprob._head_grad(*args).float(), atol=2e-2, rtol=1e-2)  # bf16 output
    assert counters["stats"]["unique_graphs"] == 2
