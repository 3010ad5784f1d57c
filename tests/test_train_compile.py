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


def test_compiled_layers_match_eager_and_do_not_recompile_per_length(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from areal_hpc import toy
    from areal_hpc.train import attention, parallel

    path = toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path)
    impl = attention.resolve_impl("varlen")
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
        a, b = eager(**x).logits, compiled(**x).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        ga = torch.autograd.grad(a.square().mean(), list(eager.parameters()))
        gb = torch.autograd.grad(b.square().mean(), list(compiled.parameters()))
        for u, v in zip(gb, ga):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
        if i == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
            assert graphs_after_first > 0  # the layers really were compiled
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # dynamic lengths: no recompilation


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
