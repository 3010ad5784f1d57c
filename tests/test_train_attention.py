"""Document-aware attention on CPU (`attn_impl=varlen` without the flash kernel)."""

import pytest
import torch
import torch.nn.functional as F

from areal_hpc.train import packed_attention


def reference(q, k, v, lens):
    """Causal attention of each document alone, K/V repeated to the query heads: ``[T, Hq, D]``."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    outs, s = [], 0
    for n in lens:
        outs.append(F.scaled_dot_product_attention(q[None, :, s:s + n], k[None, :, s:s + n], v[None, :, s:s + n],
                                                   is_causal=True)[0])
        s += n
    return torch.cat(outs, 1).transpose(0, 1)


@pytest.mark.parametrize("lens", [[5, 5, 3, 7, 1, 5], [5] * 64, [40, 1, 1], [9], [3, 0, 4]],
                         ids=["similar", "many-equal", "one-long", "one", "empty-doc"])
def test_per_document_attention_matches_each_document_alone(lens):
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = (torch.randn(h, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    out = packed_attention._per_document(q, k, v, cu, None)
    want = reference(q, k, v, lens)
    torch.testing.assert_close(out, want)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
