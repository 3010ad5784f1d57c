"""The embedded hf engine in-process: numerics against a full forward pass, batching, pause modes,
weight swaps, sampling filters. CPU, tiny model, a few seconds."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
import torch

from areal_hpc.inference.hf_engine import LLMEngine, ModelRunner, SamplingParams, Sequence
from areal_hpc.inference.hf_engine.sampler import sample
from areal_hpc.toy import resolve_model
from helpers import engine_app

MODEL = "toy:qwen3-h128-l2"


@pytest.fixture(scope="module")
def model_path():
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def reference(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vocab(reference):
    return reference.config.vocab_size


@pytest.fixture
def engine(model_path):
    eng = LLMEngine(ModelRunner(model_path, max_running=32)).start()
    yield eng
    eng.stop()


def run(engine, seqs, timeout=30.0, together=False):
    """Submit ``seqs`` and wait for all; ``together``: while the engine is paused, so that its next
    step sees every one of them (one prefill, as `/generate` with n > 1 submits them)."""
    done = threading.Semaphore(0)
    if together:
        engine.pause("abort").result(5)
    for s in seqs:
        s.on_finish = lambda _s: done.release()
        engine.submit(s)
    if together:
        engine.resume().result(5)
    for _ in seqs:
        assert done.acquire(timeout=timeout), "engine did not finish in time"
    return seqs


def check_against_forward(model, seq, tol=1e-4):
    """Logprobs of the generated tokens = log_softmax(logits / T) of a full forward pass."""
    ids = torch.tensor([seq.prompt_ids + seq.output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    n = len(seq.prompt_ids)
    t = seq.params.temperature if seq.params.temperature > 0 else 1.0
    ref = torch.log_softmax(logits[n - 1:-1] / t, -1).gather(1, torch.tensor(seq.output_ids)[:, None])[:, 0]
    got = torch.tensor(seq.logprobs)
    assert torch.allclose(got, ref, atol=tol), (got - ref).abs().max()
    if seq.params.temperature == 0:
        assert logits[n - 1:-1].argmax(-1).tolist() == seq.output_ids


def test_logprobs_match_forward_pass_with_staggered_arrivals(engine, reference, vocab):
    rng = random.Random(0)
    seqs = []
    for i in range(24):
        params = SamplingParams(max_new_tokens=rng.choice([1, 7, 20, 33]), temperature=rng.choice([0.0, 1.0, 0.7]),
                                top_k=rng.choice([-1, 5]), top_p=rng.choice([1.0, 0.8]), ignore_eos=True)
        seqs.append(Sequence([rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))], params))
    # arrivals spread over time: requests join and leave a running batch
    done = threading.Semaphore(0)
    for i, s in enumerate(seqs):
        s.on_finish = lambda _s: done.release()
        engine.submit(s)
        if i % 5 == 0:
            time.sleep(0.01)
    for _ in seqs:
        assert done.acquire(timeout=30)
    for s in seqs:
        assert len(s.output_ids) == s.params.max_new_tokens
        assert s.finish_reason == {"type": "length", "length": s.params.max_new_tokens}
        check_against_forward(reference, s)
    assert engine.stats["prefill_steps"] >= 2  # really joined at different times


def test_greedy_is_deterministic_across_batch_compositions(engine, vocab):
    prompt = [5, 9, 11, 3, 7]
    alone = run(engine, [Sequence(prompt, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))])[0]
    crowd = [Sequence([random.randrange(3, vocab) for _ in range(random.randrange(1, 20))],
                      SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True)) for _ in range(12)]
    target = Sequence(prompt, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    run(engine, crowd[:6] + [target] + crowd[6:])
    assert target.output_ids == alone.output_ids
    assert max(abs(a - b) for a, b in zip(target.logprobs, alone.logprobs)) < 1e-4


def test_samples_of_one_prompt_share_its_prefill(engine, reference, vocab):
    """n samples of a prompt arrive together (as `/generate` with n > 1 submits them): the prompt
    runs once and its keys are copied to every sample's row; each sample then goes its own way,
    and every token's logprob still matches a full forward pass of its own sequence."""
    prompts = [[random.randrange(3, vocab) for _ in range(k)] for k in (4, 9, 13)]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True))
            for p in prompts for _ in range(6)]
    runner, rows_run = engine.runner, []
    forward = runner._forward
    runner._forward = lambda ids, mask, pos: rows_run.append(ids.shape) or forward(ids, mask, pos)
    try:
        run(engine, seqs, together=True)
    finally:
        runner._forward = forward
    for s in seqs:
        check_against_forward(reference, s)
    assert len({tuple(s.output_ids) for s in seqs[:6]}) > 1  # the samples differ after the first token
    prefill_rows = sum(shape[0] for shape in rows_run if shape[1] > 1)  # decode steps run one column
    assert prefill_rows == len(prompts), rows_run  # each prompt once


def test_one_token_samples_skip_the_kv_copy(engine, reference, vocab):
    """Samples that end with their first token (max_new_tokens=1) never decode: the shared
    prefill's keys are not copied to their rows, and their logprobs are still right."""
    prompt = [random.randrange(3, vocab) for _ in range(7)]
    seqs = [Sequence(prompt, SamplingParams(max_new_tokens=1, temperature=1.0, ignore_eos=True)) for _ in range(8)]
    kv = engine.runner.kv
    spread, copies = kv.spread_rows, []
    kv.spread_rows = lambda *a: copies.append(a) or spread(*a)
    try:
        run(engine, seqs, together=True)
    finally:
        del kv.spread_rows
    assert copies == []
    for s in seqs:
        assert len(s.output_ids) == 1
        check_against_forward(reference, s)


def test_stop_tokens_eos_and_zero_budget(engine, reference):
    # which token does greedy produce first? make it a stop token
    probe = run(engine, [Sequence([4, 4, 4], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))])[0]
    first = probe.output_ids[0]
    s = run(engine, [Sequence([4, 4, 4], SamplingParams(max_new_tokens=10, temperature=0,
                                                         stop_token_ids=(first,)))])[0]
    assert s.output_ids == [first] and s.finish_reason == {"type": "stop", "matched": first}
    z = run(engine, [Sequence([4, 4], SamplingParams(max_new_tokens=0))])[0]
    assert z.output_ids == [] and z.finish_reason["type"] == "length"


def test_a_stop_token_at_max_new_tokens_finishes_as_stop(engine):
    """SGLang 0.5.23 (the version pinned; `Req.update_finish_state` in managers/schedule_batch.py) checks stop tokens
    before the length: a stop token sampled as the max_new_tokens-th token finishes with "stop" (and the text leaves it
    out). The hf engine followed an older SGLang (`Req.check_finished`, length first) and reported "length", so the
    same generation counted as truncated on hf servers only."""
    probe = run(engine, [Sequence([5, 9, 13], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))])[0]
    last = probe.output_ids[2]
    assert not {last, *engine.eos_token_ids} & set(probe.output_ids[:2]), "the toy model's greedy output changed"
    stops = (last,)
    for budget in (3, 4):
        s = run(engine, [Sequence([5, 9, 13], SamplingParams(max_new_tokens=budget, temperature=0,
                                                             stop_token_ids=stops))])[0]
        assert s.output_ids == probe.output_ids and s.finish_reason == {"type": "stop", "matched": last}


def test_ignore_eos_ignores_stop_token_ids_too(engine):
    """In SGLang, ignore_eos turns off every stop token, stop_token_ids included (`Req._check_token_based_finish`
    returns at once). The hf engine still stopped on stop_token_ids: the same request (a generation config with
    ignore_eos and stop tokens) gave shorter completions on hf servers than on SGLang ones."""
    probe = run(engine, [Sequence([4, 4, 4], SamplingParams(max_new_tokens=1, temperature=0))])[0]
    s = run(engine, [Sequence([4, 4, 4], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True,
                                                        stop_token_ids=tuple(probe.output_ids)))])[0]
    assert len(s.output_ids) == 5 and s.finish_reason == {"type": "length", "length": 5}

def test_pause_abort_returns_partial_and_holds_new_work(engine, reference):
    long = [Sequence([3 + i, 8, 9], SamplingParams(max_new_tokens=2000, temperature=1.0, ignore_eos=True))
            for i in range(4)]
    done = threading.Semaphore(0)
    for s in long:
        s.on_finish = lambda _s: done.release()
        engine.submit(s)
    while not all(len(s.output_ids) >= 3 for s in long):
        time.sleep(0.005)
    assert engine.pause("abort").result(5) == 4
    for _ in long:
        assert done.acquire(timeout=5)
    for s in long:
        assert s.finish_reason["type"] == "abort" and 3 <= len(s.output_ids) < 2000
        check_against_forward(reference, s)
    held = Sequence([5, 6], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    ev = threading.Event()
    held.on_finish = lambda _s: ev.set()
    engine.submit(held)
    assert not ev.wait(0.3), "a request sent while paused must wait for continue"
    engine.resume().result(5)
    assert ev.wait(10) and len(held.output_ids) == 4


def test_pause_abort_aborts_the_waiting_requests_too(model_path):
    """SGLang's pause in abort mode aborts every request the scheduler holds (`abort_all`), those still waiting for a
    batch slot too; only what arrives after the pause waits for continue. The hf engine aborted the running ones and
    kept the waiting ones, which then ran on the new weights with no abort to tell their client."""
    eng = LLMEngine(ModelRunner(model_path, max_running=2)).start()
    try:
        seqs = [Sequence([3 + i, 8, 9], SamplingParams(max_new_tokens=2000, ignore_eos=True)) for i in range(4)]
        done = threading.Semaphore(0)
        for s in seqs:
            s.on_finish = lambda _s: done.release()
            eng.submit(s)
        while not (len(eng.scheduler.running) == 2 and all(s.output_ids for s in eng.scheduler.running)):
            time.sleep(0.002)
        assert len(eng.scheduler.waiting) == 2
        assert eng.pause("abort").result(5) == 4
        for _ in seqs:
            assert done.acquire(timeout=5), "a waiting request was held, not aborted"
        assert all(s.finish_reason["type"] == "abort" for s in seqs)
        assert sorted(len(s.output_ids) > 0 for s in seqs) == [False, False, True, True]
    finally:
        eng.stop()


def test_pause_retract_and_in_place_keep_requests(engine, reference):
    for mode in ("retract", "in_place"):
        seqs = [Sequence([7, 8, 9 + i], SamplingParams(max_new_tokens=60, temperature=0.8, ignore_eos=True))
                for i in range(3)]
        done = threading.Semaphore(0)
        for s in seqs:
            s.on_finish = lambda _s: done.release()
            engine.submit(s)
        while not all(len(s.output_ids) >= 2 for s in seqs):
            time.sleep(0.002)
        engine.pause(mode).result(5)
        n = [len(s.output_ids) for s in seqs]
        time.sleep(0.1)
        assert [len(s.output_ids) for s in seqs] == n, f"{mode}: nothing may run while paused"
        engine.resume().result(5)
        for _ in seqs:
            assert done.acquire(timeout=20)
        for s in seqs:
            assert len(s.output_ids) == 60 and s.finish_reason["type"] == "length"
            check_against_forward(reference, s)


def test_abort_by_rid(engine):
    a = Sequence([3, 4], SamplingParams(max_new_tokens=5000, ignore_eos=True), rid="victim")
    b = Sequence([3, 5], SamplingParams(max_new_tokens=20, ignore_eos=True))
    done = threading.Semaphore(0)
    for s in (a, b):
        s.on_finish = lambda _s: done.release()
        engine.submit(s)
    time.sleep(0.05)
    assert engine.abort("victim").result(5) == 1
    assert done.acquire(timeout=5) and done.acquire(timeout=10)
    assert a.finish_reason["type"] == "abort" and b.finish_reason["type"] == "length"


def test_weight_swap_between_steps_tracks_versions(engine, model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    s = Sequence([3, 4, 5], SamplingParams(max_new_tokens=400, temperature=1.0, ignore_eos=True))
    done = threading.Event()
    s.on_finish = lambda _s: done.set()
    engine.submit(s)
    while len(s.output_ids) < 5:
        time.sleep(0.001)
    tensors = list(other.state_dict().items())
    assert not engine.runner.check_weights((n, t.shape) for n, t in tensors)
    res = engine.update_weights(tensors, version="7").result(10)
    assert res["weight_version"] == "7" and engine.weight_version == "7"
    assert done.wait(20)
    versions = [v for v, a, b in s.version_spans]
    assert versions == ["0", "7"], s.version_spans  # tokens before and after the swap
    assert s.version_spans[0][2] == s.version_spans[1][1]
    probe = run(engine, [Sequence([3, 4, 5], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))])[0]
    check_against_forward(other.eval(), probe)
    bad = [("model.embed_tokens.weight", torch.zeros(3, 3))]
    assert any("shape" in p for p in engine.runner.check_weights((n, t.shape) for n, t in bad))


def test_a_weight_update_that_fails_part_way_is_refused_until_a_complete_one(engine, reference):
    """A weight update (from disk) whose copy failed after some tensors were copied left the model partly updated yet
    still served under the old version. Now every request gets a 503 until every tensor has been loaded again, and a
    second failure forgets what was loaded before it."""
    runner = engine.runner
    names = list(runner._params)
    old = [(n, runner._params[n].detach().clone()) for n in names]
    half = len(names) // 2
    torn = [(n, t + 1) for n, t in old[:half]] + [(names[half], torch.zeros(3, 3))] + old[half + 1:]

    def refused() -> bool:
        seq = run(engine, [Sequence([3, 4, 5], SamplingParams(max_new_tokens=2, temperature=0))])[0]
        assert seq.finish_reason.get("status_code") in (None, 503), seq.finish_reason
        return seq.finish_reason.get("status_code") == 503 and "partly updated" in seq.finish_reason["message"]

    with pytest.raises(RuntimeError):
        engine.update_weights(torn, version="3").result(10)
    assert torch.equal(runner._params[names[0]], old[0][1] + 1), "the copy stopped part way"
    assert engine.weight_version == "0" and refused()
    engine.update_weights(old[:half], version="4").result(10)
    assert refused()  # the rest may still be torn
    with pytest.raises(RuntimeError):
        engine.update_weights(torn).result(10)
    engine.update_weights(old[half:], version="5").result(10)
    assert refused()  # the first half was torn again
    engine.update_weights(old, version="6").result(10)
    assert not refused()
    check_against_forward(reference, run(engine, [Sequence([3, 4, 5], SamplingParams(max_new_tokens=8,
                                                                                     temperature=0))])[0])


def test_sampler_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.5, top_p=0.05), SamplingParams(temperature=0)]
    allowed3 = set(logits[1].topk(3).indices.tolist())
    for _ in range(30):
        toks, lps = sample(logits, params)
        assert toks[0] == logits[0].argmax().item()
        assert toks[1] in allowed3
        assert toks[2] == logits[2].argmax().item()  # top_p this small keeps only the best token
        assert toks[3] == logits[3].argmax().item()
        assert abs(lps[2] - torch.log_softmax(logits[2] / 0.5, -1).max().item()) < 1e-5
        assert abs(lps[3] - torch.log_softmax(logits[3], -1).max().item()) < 1e-5


def test_a_huge_top_k_does_not_fail_the_batch_it_is_sampled_in():
    """top_k above the vocabulary means the whole vocabulary, however large: one past int64 (valid JSON, accepted by
    the validation) failed the sampling of its step, so every request decoding beside it got a 500."""
    logits = torch.randn(2, 50)
    toks, _ = sample(logits, [SamplingParams(top_k=3), SamplingParams(top_k=10 ** 30)])
    assert toks[0] in set(logits[0].topk(3).indices.tolist()) and 0 <= toks[1] < 50

def test_sampling_params_validation():
    from areal_hpc.inference.http_validate import RequestError, engine_sampling_params as sampling_params

    assert sampling_params(None) == SamplingParams()
    assert sampling_params({"frequency_penalty": 0.0}).max_new_tokens == 128
    # every field the engine implements is read from the request (none accepted and ignored)
    varied = {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "stop_token_ids": [2, 5],
              "ignore_eos": True}
    assert set(varied) == {f.name for f in dataclasses.fields(SamplingParams)}  # a new field needs a case here
    got = sampling_params(varied)
    assert {k: getattr(got, k) for k in varied} == {**varied, "stop_token_ids": (2, 5)}
    assert sampling_params({"stop_token_ids": 4}).stop_token_ids == (4,)
    assert sampling_params({"stop_token_ids": 0}).stop_token_ids == (0,)  # token 0 is a token, not "none"
    for bad in ({"max_new_tokens": -1}, {"temperature": -0.1}, {"top_p": 0}, {"top_k": 0}, {"bogus": 1},
                {"max_new_tokens": "5"}, {"stop_token_ids": ["a"]}, {"repetition_penalty": 1.3},
                {"ignore_eos": "yes"}, {"stop": ["x"]}):
        with pytest.raises(RequestError):
            sampling_params(bad)


def test_the_sampling_params_sglangs_own_frontend_sends_are_accepted():
    """SGLang's frontend (sglang/lang/ir.py, SglSamplingParams.to_srt_kwargs, sent by RuntimeEndpoint.generate) sends
    every key it knows, unset ones empty: "stop_regex": [], "regex": null, "json_schema": null. SGLang reads empty as
    off; the hf server refused each as an "unknown sampling_params key", so every request of that client was a 400."""
    from areal_hpc.inference.http_validate import RequestError, engine_sampling_params as sampling_params

    frontend = {"max_new_tokens": 3, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [],
                "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0, "ignore_eos": False, "regex": None, "json_schema": None}
    assert sampling_params(frontend) == SamplingParams(max_new_tokens=3, temperature=0.0)
    for key, value in (("stop_regex", ["x"]), ("regex", "a+"), ("json_schema", "{}"), ("ebnf", "x"), ("beam_width", 2)):
        with pytest.raises(RequestError, match=key):  # set, they are still refused
            sampling_params({key: value})


def test_stop_strings_are_refused_for_what_they_are(engine):
    """The hf engine does not implement stop strings; its 400 said they need a tokenizer, also to a text request on a
    server whose model has one, which sent users looking for a missing tokenizer instead of to stop_token_ids."""
    from areal_hpc.inference.http_server import EngineServer

    (status, body), = _post_all(EngineServer(engine), [{"text": "3+4=", "sampling_params": {"stop": ["7"]}}])
    assert status == 400 and "not supported by the hf engine" in body["error"]["message"], body
    assert "tokenizer" not in body["error"]["message"] and "stop_token_ids" in body["error"]["message"]


def test_a_null_sampling_param_is_its_default():
    """null for a sampling_params key means its default, in SGLang and for every other key here: ignore_eos null was
    a 400 ("must be true or false") for a client that fills every key it does not set with null."""
    from areal_hpc.inference.http_validate import engine_sampling_params as sampling_params

    keys = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sampling_params(dict.fromkeys(keys)) == SamplingParams()

@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_the_part_map_takes_one_conversion_call_for_a_dense_model(model_path, tmp_path, monkeypatch, arch):
    """The runner maps checkpoint names transformers converts (a MoE layer's experts, fused) to their parameter. It
    called ``revert_weight_conversion`` once per parameter, also for a dense model that has no such names (about
    145 ms for a 291-tensor model at start). One call on the whole state dict now finds the parameters it changes;
    only those (the fused experts) are mapped one by one, to the same map as before."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers import core_model_loading as cml

    if arch == "moe":
        cfg = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                   moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
        model_path = str(tmp_path)
    real, calls = cml.revert_weight_conversion, []
    monkeypatch.setattr(cml, "revert_weight_conversion", lambda m, sd: calls.append(list(sd)) or real(m, sd))
    runner = ModelRunner(model_path, max_running=2)
    want = {}  # the map as one call per parameter builds it
    for name, p in runner._params.items():
        meta = {name: torch.empty(p.shape, dtype=p.dtype, device="meta")}
        want.update({k: (name, tuple(t.shape)) for k, t in real(runner.model, meta).items() if k != name})
    assert runner._parts == want
    if arch == "dense":
        assert want == {} and len(calls) == 1
    else:  # the 4 fused parameters (gate_up_proj and down_proj of 2 layers), 4 experts each
        assert len(want) == 2 * 4 * 3 and len(calls) == 1 + 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_each_expert_of_a_moe_model_is_kept_as_a_strided_view_of_its_fused_parameter(tmp_path, device):
    """A broadcast expert went into its fused parameter through an int64 index of all the parameter's elements, built
    per bucket. The runner now finds, once at start, each part's place as a view (strides, offset: plain numbers, no
    tensor held), and only where converting an index of the parameter gives exactly that view's elements. The views
    of the real weights are transformers' own parts of them."""
    pytest.importorskip("transformers.core_model_loading", reason="transformers 4 holds each expert apart")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    runner = ModelRunner(str(tmp_path), max_running=2, device=device)
    assert runner._views.keys() == runner._parts.keys() and len(runner._views) == 2 * 4 * 3
    for name, (whole, shape) in runner._parts.items():
        strides, offset = runner._views[name]
        assert all(type(x) is int for x in (*strides, offset))
        p = runner._params[whole]
        part = revert_weight_conversion(runner.model, {whole: p})[name]
        assert torch.equal(p.as_strided(shape, strides, offset), part)


def test_static_decode_path_matches_forward_pass(model_path, reference, vocab):
    """The CUDA-graph path's fixed buffers and bucketed batches (padding rows, bucketed widths),
    run eagerly on CPU."""
    runner = ModelRunner(model_path, max_running=12, context_length=300, decode_mode="static")
    assert runner.kv.rows == 12 and runner.kv.cols == 300 and not runner.cuda_graphs
    eng = LLMEngine(runner).start()
    try:
        rng = random.Random(1)
        seqs = [Sequence([rng.randrange(3, vocab) for _ in range(rng.randrange(1, 140))],
                         SamplingParams(max_new_tokens=rng.choice([3, 17, 40]), temperature=rng.choice([0.0, 1.0]),
                                        ignore_eos=True)) for _ in range(20)]  # more than fit: queueing too
        run(eng, seqs)
        for s in seqs:
            assert len(s.output_ids) == s.params.max_new_tokens
            check_against_forward(reference, s)
    finally:
        eng.stop()
    with pytest.raises(ValueError, match="CUDA"):
        ModelRunner(model_path, decode_mode="graph")


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_grouped_query_decode_matches_forward_pass(tmp_path_factory, decode_mode):
    """Decode steps of a grouped-query model (8 query heads on 2 KV heads) attend without copying
    K/V (`hf_engine.kv_cache.kv_attention_forward`); logprobs still equal a plain forward pass."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("gqa")
    cfg = AutoConfig.for_model("qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=True)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    eng = LLMEngine(ModelRunner(str(path), max_running=8, context_length=200, decode_mode=decode_mode)).start()
    try:
        rng = random.Random(2)
        seqs = [Sequence([rng.randrange(0, 97) for _ in range(rng.randrange(1, 60))],
                         SamplingParams(max_new_tokens=rng.choice([5, 30]), temperature=rng.choice([0.0, 1.0]),
                                        ignore_eos=True)) for _ in range(10)]
        run(eng, seqs)
        for s in seqs:
            check_against_forward(reference, s)
    finally:
        eng.stop()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_sliding_window_model_is_served_only_within_its_window(tmp_path_factory, arch):
    """The runner's masks are plain causal ones: a model with sliding-window attention (Mistral v0.1, Qwen2 with
    use_sliding_window) attended to the whole sequence, so past the window every token and logprob was wrong, silently
    (here, a window of 8: logprobs off by 0.2, other greedy tokens). The context length is now capped at the window:
    a longer request is refused, as one over the context length, and what is served equals the model's own forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp(f"sliding-{arch}")
    extra = {"use_sliding_window": True, "max_window_layers": 0} if arch == "qwen2" else {}
    cfg = AutoConfig.for_model(arch, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               sliding_window=8, **extra)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eng = LLMEngine(ModelRunner(str(path), max_running=4, context_length=200)).start()
    try:
        long, short = (Sequence(list(range(3, 3 + k)), SamplingParams(max_new_tokens=10, temperature=0,
                                                                       ignore_eos=True)) for k in (30, 3))
        run(eng, [long, short])
        assert long.finish_reason["type"] == "abort" and long.finish_reason["status_code"] == 400
        assert short.output_ids and short.num_tokens <= 8
        check_against_forward(reference, short)
    finally:
        eng.stop()


@pytest.mark.parametrize("arch,scale", [("granite", {"logits_scaling": 4.0}), ("cohere", {"logit_scale": 0.25})])
def test_a_model_that_scales_its_logits_is_scored_with_them(tmp_path_factory, arch, scale):
    """Granite divides its lm_head's logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``; the runner
    applies the lm_head itself and left the scale out: every logprob (and the distribution sampled) was wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp(f"scaled-{arch}")
    cfg = AutoConfig.for_model(arch, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **scale)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eng = LLMEngine(ModelRunner(str(path), max_running=4, context_length=128)).start()
    try:
        seqs = [Sequence([5 + i, 9, 13], SamplingParams(max_new_tokens=6, temperature=t, ignore_eos=True))
                for i, t in enumerate((0.0, 1.0))]
        run(eng, seqs)
        for s in seqs:
            check_against_forward(reference, s)
    finally:
        eng.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(model_path):
    outs = {}
    for mode in ("graph", "eager"):
        runner = ModelRunner(model_path, device="cuda", dtype="float32", max_running=16, context_length=512,
                             decode_mode=mode)
        eng = LLMEngine(runner).start()
        try:
            seqs = [Sequence([3 + i % 10, 4, 5], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
                    for i in range(10)]
            run(eng, seqs)
            outs[mode] = [(s.output_ids, s.logprobs) for s in seqs]
            if mode == "graph":
                assert runner.cuda_graphs, "graph capture failed (see log)"
        finally:
            eng.stop()
    for (ids_g, lp_g), (ids_e, lp_e) in zip(outs["graph"], outs["eager"]):
        assert ids_g == ids_e
        assert max(abs(a - b) for a, b in zip(lp_g, lp_e)) < 1e-3


def test_health_generate_reports_a_failing_engine(engine, monkeypatch):
    """/health_generate runs one token through the engine: a step that fails is a 503, not ``ok``."""
    import asyncio

    from areal_hpc.inference.http_server import EngineServer

    server = EngineServer(engine)
    assert asyncio.run(server.health_generate(None)).status == 200

    def broken(seqs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    resp = asyncio.run(server.health_generate(None))
    assert resp.status == 503 and "device lost" in resp.text


def test_health_generate_of_a_busy_engine_answers_without_waiting_for_a_batch_slot(model_path):
    """SGLang 0.5.23's /health_generate (entrypoints/http_server.py) is 200 as soon as the scheduler sends any output
    after the probe came: a server whose batch is full is busy, not broken. The hf server waited for its probe to get a
    slot, i.e. for a running request to end: under a full batch of long generations it answered after minutes, or 503
    "timed out" after 20 s, and a load balancer polling it took a healthy, busy server out."""
    import asyncio

    from areal_hpc.inference.http_server import EngineServer

    eng = LLMEngine(ModelRunner(model_path, max_running=1, context_length=2048)).start()
    try:
        long = Sequence([3, 8, 9], SamplingParams(max_new_tokens=2000, ignore_eos=True))
        eng.submit(long)
        while len(long.output_ids) < 3:
            time.sleep(0.005)
        t0 = time.monotonic()
        resp = asyncio.run(EngineServer(eng).health_generate(None))
        assert resp.status == 200 and not long.finished, (resp.text, len(long.output_ids))
        assert time.monotonic() - t0 < 2.0
        deadline = time.monotonic() + 2.0
        while eng.snapshot()["num_waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.snapshot()["num_waiting"] == 0 and not long.finished  # the probe left the queue, aborted
    finally:
        eng.stop()


def test_a_stream_that_fails_aborts_its_sequences(engine):
    """A streamed /generate whose rendering fails (here: the tokenizer's decode, after the first chunk) must abort
    its sequences, not leave them generating on the engine until max_new_tokens."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    class BreaksAfterOneDecode:
        decodes = 0

        def encode(self, text):
            return [3, 4, 5]

        def decode(self, ids, **kw):
            self.decodes += 1
            if self.decodes > 1:
                raise ValueError("decode failed")
            return "x"

    server = EngineServer(engine)
    server._tokenizer = BreaksAfterOneDecode()
    body = {"text": "hi", "stream": True,
            "sampling_params": {"max_new_tokens": engine.runner.context_length - 3, "ignore_eos": True}}

    async def go():
        async with engine_app(server) as url:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                async with s.post(url + "/generate", json=body) as r:
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()  # the stream breaks off: no [DONE]
                async with s.post(url + "/generate",
                                  json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2}}) as r:
                    assert r.status == 200  # the server serves on
            # commands run in order: any abort the handler asked for has run when this one answers
            return await asyncio.wait_for(asyncio.wrap_future(engine.call(lambda: len(engine.scheduler.running))), 10)

    assert asyncio.run(go()) == 0
    assert engine.stats["aborted_requests"] == 1


# fix8-D
def test_stop_finishes_what_a_long_step_kept_from_its_abort(engine, monkeypatch):
    """`stop` gives its abort ``timeout`` seconds; a step that outlasts it (a big prefill, a slow device) must not
    leave the sequences it ran, or those waiting behind it, unfinished: their waiters would hang for good."""
    gate, in_step = threading.Event(), threading.Event()
    decode = engine.runner.decode

    def slow_decode(seqs):
        in_step.set()
        gate.wait(30)
        return decode(seqs)

    running = Sequence([3, 4, 5], SamplingParams(max_new_tokens=100, ignore_eos=True))
    engine.submit(running)
    monkeypatch.setattr(engine.runner, "decode", slow_decode)
    assert in_step.wait(10)
    waiting = Sequence([6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True))
    engine.submit(waiting)
    engine.stop(timeout=0.2)
    gate.set()  # the step ends after stop gave up waiting for its abort
    engine._thread.join(10)
    assert not engine.alive
    for seq in (running, waiting):
        assert seq.finished and seq.finish_reason["type"] == "abort", seq.finish_reason


# fix11-I
def test_work_sent_while_the_loop_exits_fails_instead_of_hanging(model_path):
    """A `submit` or `call` that comes after the loop's last look at its queues, while its thread still runs (here:
    held there), must be answered at once: nothing would ever take it, and its caller would wait for good."""
    exited, release = threading.Event(), threading.Event()

    class ExitsSlowly(LLMEngine):
        def _run(self):
            super()._run()
            exited.set()
            release.wait(30)

    eng = ExitsSlowly(ModelRunner(model_path, max_running=4)).start()
    eng.stop(timeout=0)
    assert exited.wait(10) and eng.alive
    late = Sequence([3, 4], SamplingParams(max_new_tokens=2))
    eng.submit(late)
    command = eng.call(lambda: "ran")
    release.set()
    eng._thread.join(10)
    assert late.finished and late.finish_reason["status_code"] == 503
    with pytest.raises(RuntimeError, match="not running"):
        command.result(0)


def test_text_leaves_out_the_stop_token_unless_no_stop_trim(engine):
    """SGLang's ``text`` leaves out the stop token that ended the generation (``output_ids`` keep it), and keeps it
    with ``sampling_params.no_stop_trim``. The hf server accepted no_stop_trim but ignored it: its text always ended
    with the stop token. Streamed, no chunk shows it either."""
    import asyncio
    import json

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    server = EngineServer(engine)
    stops = [t for t in range(engine.runner.vocab_size) if t not in engine.runner.eos_token_ids and t > 2]

    async def go():
        async with engine_app(server) as url, aiohttp.ClientSession() as s:
            out = []
            for keep in (False, True):
                body = {"text": "12+3=", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                             "stop_token_ids": stops, "no_stop_trim": keep}}
                async with s.post(url + "/generate", json=body) as r:
                    assert r.status == 200, await r.text()
                    out.append(await r.json())
            async with s.post(url + "/generate", json={**body, "stream": True, "sampling_params": {
                    **body["sampling_params"], "no_stop_trim": False}}) as r:
                chunks = [json.loads(line[6:]) for line in (await r.text()).split("\n\n") if line[6:].startswith("{")]
            one = {**body, "sampling_params": {**body["sampling_params"], "max_new_tokens": 1, "no_stop_trim": False}}
            async with s.post(url + "/generate", json=one) as r:  # a stop token as the last allowed one: "stop"
                out.append(await r.json())
            return out, chunks, await server.tokenizer()

    (trimmed, kept, last), chunks, tok = asyncio.run(go())
    assert last["meta_info"]["finish_reason"] == {"type": "stop", "matched": last["output_ids"][0]}
    assert last["output_ids"][0] in stops and last["text"] == ""
    assert chunks[-1]["text"] == trimmed["text"] and all(trimmed["text"].startswith(c["text"]) for c in chunks)
    ids = trimmed["output_ids"]
    assert trimmed["meta_info"]["finish_reason"]["matched"] == ids[-1] in stops and kept["output_ids"] == ids
    assert trimmed["text"] == tok.decode(ids[:-1], skip_special_tokens=True)
    assert kept["text"] == tok.decode(ids, skip_special_tokens=True) != trimmed["text"]


def test_a_weight_version_that_is_no_string_is_refused(engine):
    """A weight version is a string in SGLang's requests (a null or an object there is a 422). The hf server took any
    JSON value and served str() of it as the version of every token after it, "None" or "{'v': 1}", which no trainer
    can compare with its own (and a later update without a version could no longer move it on)."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    server = EngineServer(engine)

    async def go():
        async with engine_app(server) as url, aiohttp.ClientSession() as s:
            async def post(path, body):
                async with s.post(url + path, json=body) as r:
                    return r.status, engine.weight_version

            path = engine.runner.model_path
            assert await post("/update_weight_version", {"new_version": None}) == (400, "0")
            assert await post("/update_weight_version", {"new_version": {"v": 1}}) == (400, "0")
            assert await post("/update_weights_from_disk", {"model_path": path, "weight_version": [2]}) == (400, "0")
            assert await post("/update_weights_from_disk", {"model_path": path, "weight_version": True}) == (400, "0")
            assert await post("/update_weight_version", {"new_version": 3}) == (200, "3")
            assert await post("/update_weights_from_disk", {"model_path": path, "weight_version": "4"}) == (200, "4")

    asyncio.run(go())


def test_a_huge_n_is_refused():
    """n = 1e20 built that many sequences on the server's event loop, which then served nobody."""
    import asyncio

    from areal_hpc.inference.http_validate import RequestError, read_generate

    async def tokenizer(why):
        raise AssertionError(why)

    for n in (10 ** 5, 1e20):
        with pytest.raises(RequestError, match="sampling_params.n=.*split the request"):
            asyncio.run(read_generate({"input_ids": [1, 2], "sampling_params": {"n": n}}, tokenizer, 50, 100))


def test_a_control_flag_must_be_a_json_boolean(engine):
    """abort_all "false" (a JSON string) aborted every request, bool() of a non-empty string being true; SGLang reads
    JSON booleans. Anything else is a 400 naming the key."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    server = EngineServer(engine)
    engine.pause("in_place").result(5)  # the sequence waits: an abort would finish it
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=4))
    engine.submit(seq)

    async def go():
        async with engine_app(server) as url, aiohttp.ClientSession() as s:
            async def post(path, body):
                async with s.post(url + path, json=body) as r:
                    return r.status, (await r.json())["error"]["message"]

            status, msg = await post("/abort_request", {"rid": "other", "abort_all": "false"})
            assert status == 400 and "abort_all must be true or false" in msg
            status, msg = await post("/update_weight_version", {"new_version": "7", "abort_all_requests": "no"})
            assert status == 400 and "abort_all_requests must be true or false" in msg
            status, msg = await post("/generate", {"input_ids": [1], "stream": "false"})
            assert status == 400 and "stream must be true or false" in msg

    asyncio.run(go())
    assert not seq.finished and engine.weight_version == "0"
    engine.resume().result(5)
    deadline = time.monotonic() + 30
    while not seq.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seq.finish_reason["type"] == "length"


def test_every_flag_and_number_of_a_request_is_read_as_its_json_type(engine):
    """After abort_all, stream and ignore_eos, the rest: no_stop_trim "false" kept the stop token, skip_special_tokens
    "false" and return_logprob "false" counted as true (bool() of a non-empty string), a master_port "29500" or 29500.7
    became 29500 (int()), rank_offset true rank 1, a tensor's shape ["3"] or [2.5] was received as (3,) or (2,), and a
    name that is not a string was a 500, and so was a group_name that is none. Each is now a 400 naming the field."""
    import asyncio
    import json

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer
    from areal_hpc.inference.http_validate import RequestError, read_generate

    async def tokenizer(why):
        raise AssertionError(why)

    for sp, body in (({"no_stop_trim": "false"}, {}), ({"skip_special_tokens": "false"}, {}),
                     ({}, {"return_logprob": "false"}), ({}, {"return_logprob": [True, "no"]})):
        key = next(iter(sp or body))
        with pytest.raises(RequestError, match=f"{key} must be true or false"):
            asyncio.run(read_generate({"input_ids": [1, 2], "sampling_params": sp, **body}, tokenizer, 50, 100))
    server = EngineServer(engine)
    server.groups["g"] = object()  # a group; nothing gets as far as using it
    name = next(iter(engine.runner._params))
    group = {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2,
             "backend": "gloo", "group_name": "g2"}
    update = {"names": [name], "dtypes": ["float32"], "shapes": [list(engine.runner._params[name].shape)],
              "group_name": "g"}
    bad = [("/init_weights_update_group", dict(group, master_port="29500"), "master_port"),
           ("/init_weights_update_group", dict(group, master_port=29500.7), "master_port"),
           ("/init_weights_update_group", dict(group, rank_offset=True), "rank_offset"),
           ("/init_weights_update_group", dict(group, world_size="2"), "world_size"),
           ("/init_weights_update_group", dict(group, rank_offset=2), "rank_offset"),
           ("/init_weights_update_group", dict(group, timeout="60"), "timeout"),
           ("/init_weights_update_group", dict(group, timeout=float("inf")), "timeout"),
           ("/update_weights_from_distributed", dict(update, shapes=[["3"]]), "shapes"),
           ("/update_weights_from_distributed", dict(update, shapes=[[2.5]]), "shapes"),
           ("/update_weights_from_distributed", dict(update, shapes=[[-1]]), "shapes"),
           ("/update_weights_from_distributed", dict(update, shapes=[[True]]), "shapes"),
           ("/update_weights_from_distributed", dict(update, names=[["w"]]), "names"),
           # a group_name that is no string: a 500 (unhashable list), or a rendezvous under the name 5 (timeout=1
           # bounds it) that dropped the groups the server had
           ("/update_weights_from_distributed", dict(update, group_name=["g"]), "group_name"),
           ("/init_weights_update_group", dict(group, group_name=5, timeout=1), "group_name"),
           ("/destroy_weights_update_group", {"group_name": ["g"]}, "group_name"),
           # SGLang's AbortReq takes a string rid; 5 or ["a"] aborted nothing and answered 200
           ("/abort_request", {"rid": 5}, "rid"), ("/abort_request", {"rid": ["a"]}, "rid")]

    async def go():
        async with engine_app(server) as url, aiohttp.ClientSession() as s:
            for path, body, key in bad:
                async with s.post(url + path, data=json.dumps(body)) as r:
                    msg = (await r.json()).get("message", "")
                    assert r.status == 400 and key in msg, (path, body, r.status, msg)

    asyncio.run(go())
    assert server.groups == {"g": server.groups["g"]}


def test_a_tiny_temperature_samples_and_scores_as_sglang_and_the_trainer_do():
    """SGLang samples greedily (scoring at temperature 1) only below 1e-6; at 5e-6 it samples at 5e-6 and scores the
    tokens at 5e-6, which is what the trainer divides its logits by. Below 1e-6 both sides score at 1."""
    from areal_hpc.config.schema import GenerationConfig

    logits = torch.randn(2, 50) * 3
    _, lps = sample(logits, [SamplingParams(temperature=5e-6), SamplingParams(temperature=5e-7)])
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0] / 5e-6, -1).max().item(), abs=1e-5)
    assert lps[1] == pytest.approx(torch.log_softmax(logits[1], -1).max().item(), abs=1e-5)
    assert [GenerationConfig(temperature=t).logprob_temperature for t in (0, 5e-7, 5e-6, 0.7)] == [1.0, 1.0, 5e-6, 0.7]


def _post_all(server, bodies):
    """``(status, json)`` of each ``/generate`` body, posted in turn to ``server``."""
    import asyncio

    import aiohttp

    async def go():
        out = []
        async with engine_app(server) as url, aiohttp.ClientSession() as s:
            for body in bodies:
                async with s.post(url + "/generate", json=body) as r:
                    out.append((r.status, await r.json()))
        return out

    return asyncio.run(go())


def test_a_request_over_the_context_length_is_refused_and_the_budget_is_capped_as_in_sglang(model_path):
    """SGLang 0.5.23 (managers/tokenizer_manager.py, `_validate_one_request`, without --allow-auto-truncate) refuses with
    a 400 a request whose input plus max_new_tokens exceeds the context length, and its scheduler
    (`init_req_max_new_tokens`) caps max_new_tokens at context_len - 1 - input - 1. The hf server took the request and
    generated until the context was full: a rollout config too long for the context worked on hf servers and was
    refused by SGLang ones."""
    from areal_hpc.inference.http_server import EngineServer

    eng = LLMEngine(ModelRunner(model_path, max_running=4, context_length=48)).start()
    try:
        prompt = list(range(3, 13))
        sp = {"ignore_eos": True, "temperature": 0}
        (s1, over), (s2, fits) = _post_all(EngineServer(eng), [
            {"input_ids": prompt, "sampling_params": {**sp, "max_new_tokens": 39}},
            {"input_ids": prompt, "sampling_params": {**sp, "max_new_tokens": 38}}])
    finally:
        eng.stop()
    assert s1 == 400 and "exceeds the model's maximum context length of 48 tokens" in over["error"]["message"], over
    assert s2 == 200 and fits["meta_info"]["finish_reason"] == {"type": "length", "length": 36}
    assert len(fits["output_ids"]) == fits["meta_info"]["completion_tokens"] == 36


def test_a_prompt_within_six_tokens_of_the_context_length_is_refused_as_in_sglang(model_path):
    """SGLang 0.5.23's scheduler refuses with a 400 (managers/utils.py `validate_input_length`, from
    managers/scheduler.py) a prompt of max_req_input_len tokens or more: context_len - 1 - 5 (managers/tp_worker.py).
    The hf server served such prompts: with max_new_tokens=1 a 46-token prompt (context 48) got a 200 with no token
    and finish_reason "length", where SGLang answers 400."""
    from areal_hpc.inference.http_server import EngineServer

    eng = LLMEngine(ModelRunner(model_path, max_running=4, context_length=48)).start()
    try:
        sp = {"ignore_eos": True, "temperature": 0, "max_new_tokens": 1}
        answers = _post_all(EngineServer(eng), [{"input_ids": [5] * n, "sampling_params": sp} for n in (46, 42, 41)])
    finally:
        eng.stop()
    for status, body in answers[:2]:
        assert status == 400 and "exceeds the maximum allowed length (42 tokens)" in body["error"]["message"], body
    status, fits = answers[2]
    assert status == 200 and len(fits["output_ids"]) == 1, fits


def test_a_null_max_new_tokens_generates_to_the_context_length(model_path):
    """In SGLang 0.5.23 a max_new_tokens left out is 128, but an explicit null means no limit but the context's
    (sampling/sampling_params.py keeps the null; managers/scheduler.py `init_req_max_new_tokens` then caps it at
    context_len - 1 - input - 1). The hf server read null as 128, as for every other key's null."""
    from areal_hpc.inference.http_server import EngineServer

    eng = LLMEngine(ModelRunner(model_path, max_running=4, context_length=160)).start()
    try:
        sp = {"ignore_eos": True, "temperature": 0}
        (s1, null), (s2, absent) = _post_all(EngineServer(eng), [
            {"input_ids": list(range(3, 13)), "sampling_params": {**sp, "max_new_tokens": None}},
            {"input_ids": list(range(3, 13)), "sampling_params": sp}])
    finally:
        eng.stop()
    assert s1 == 200 and null["meta_info"]["finish_reason"] == {"type": "length", "length": 148}
    assert s2 == 200 and absent["meta_info"]["completion_tokens"] == 128


def test_a_batch_takes_its_rid_as_a_prefix_and_refuses_duplicate_rids(engine):
    """SGLang (managers/io_struct.py, GenerateReqInput._normalize_rid and _validate_rid_uniqueness) names the requests
    of a batch sent with one rid "<rid>_<i>" (so /abort_request can reach each), and refuses a batch whose rids repeat.
    The hf server dropped a batch's rid for fresh ones, and served repeated rids (one abort then hit all of them)."""
    from areal_hpc.inference.http_server import EngineServer

    sp = {"max_new_tokens": 1}
    (s1, named), (s2, dup) = _post_all(EngineServer(engine), [
        {"input_ids": [[3, 4], [5, 6]], "rid": "grp", "sampling_params": sp},
        {"input_ids": [[3, 4], [5, 6]], "rid": ["a", "a"], "sampling_params": sp}])
    assert s1 == 200 and [o["meta_info"]["id"] for o in named] == ["grp_0", "grp_1"]
    assert s2 == 400 and "Duplicate request IDs" in dup["error"]["message"]


def test_a_rid_still_in_flight_is_refused_for_another_request(engine):
    """SGLang 0.5.23 (managers/tokenizer_manager.py, `_init_req_state`) refuses with a 400 "Duplicate request ID
    detected" a request whose rid another one still running or waiting has. The hf server served both under the one
    rid: /abort_request for one of them, or the second client going away, aborted the first client's request too."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    sp = {"max_new_tokens": 2000, "ignore_eos": True}

    async def go():
        async with engine_app(EngineServer(engine)) as url, aiohttp.ClientSession() as s:
            async def post(path, body):
                async with s.post(url + path, json=body) as r:
                    return r.status, await r.json()

            first = asyncio.ensure_future(post("/generate", {"input_ids": [3, 4], "rid": "x", "sampling_params": sp}))
            while engine.snapshot()["num_running"] < 1:
                await asyncio.sleep(0.01)
            dup = await post("/generate", {"input_ids": [[5, 6], [7, 8]], "rid": ["y", "x"], "sampling_params": sp})
            assert not first.done()
            assert await post("/abort_request", {"rid": "x"}) == (200, {"success": True, "num_aborted": 1})
            done = await first
            again = await post("/generate", {"input_ids": [3, 4], "rid": "x", "sampling_params": {"max_new_tokens": 1}})
            return dup, done, again

    (s1, dup), (s2, done), (s3, again) = asyncio.run(go())
    assert s1 == 400 and "Duplicate request ID detected: x" in dup["error"]["message"], dup
    assert s2 == 200 and done["meta_info"]["finish_reason"]["type"] == "abort"
    assert s3 == 200 and again["meta_info"]["id"] == "x"  # free again once its request ended


def test_an_abort_by_rid_reaches_every_request_whose_rid_starts_with_it(model_path):
    """SGLang 0.5.23's /abort_request: `TokenizerManager.abort_request` drops the abort of a rid no request has, then
    `Scheduler.abort_request` aborts every request, waiting or running, whose rid starts with it ("ep": the request
    "ep" and the batch "ep_0", "ep_1"). The samples of an n > 1 request get fresh rids (`regenerate_rid`): its rid
    reaches none. The hf server aborted the one request whose rid was the rid given."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    eng = LLMEngine(ModelRunner(model_path, max_running=2)).start()  # "ep" and "other" run, the rest waits
    sp = {"max_new_tokens": 2000, "ignore_eos": True}
    bodies = [{"input_ids": [3, 4], "rid": "ep", "sampling_params": sp},
              {"input_ids": [3, 5], "rid": "other", "sampling_params": sp},
              {"input_ids": [[3, 6], [3, 7]], "rid": "ep", "sampling_params": sp},
              {"input_ids": [3, 8], "rid": "fam", "sampling_params": {**sp, "n": 2}}]

    def held():
        snap = eng.snapshot()
        return snap["num_running"] + snap["num_waiting"]

    async def go():
        async with engine_app(EngineServer(eng)) as url, aiohttp.ClientSession() as s:
            async def post(path, body):
                async with s.post(url + path, json=body) as r:
                    return r.status, await r.json()

            gens = []
            for body, n in zip(bodies, (1, 2, 4, 6)):  # in order: the first two take the two rows
                gens.append(asyncio.ensure_future(post("/generate", body)))
                while held() < n:
                    await asyncio.sleep(0.01)
            assert await post("/abort_request", {"rid": "ep_"}) == (200, {"success": True, "num_aborted": 0})
            assert await post("/abort_request", {"rid": "fam"}) == (200, {"success": True, "num_aborted": 0})
            assert await post("/abort_request", {"rid": "ep"}) == (200, {"success": True, "num_aborted": 3})
            assert held() == 3 and not any(g.done() for g in gens[1::2])  # "other" and the samples go on
            assert await post("/abort_request", {"abort_all": True}) == (200, {"success": True, "num_aborted": 3})
            return [await g for g in gens]

    try:
        (s1, ep), (s2, other), (s3, batch), (s4, fam) = asyncio.run(go())
    finally:
        eng.stop()
    assert {s1, s2, s3, s4} == {200} and [o["meta_info"]["id"] for o in batch] == ["ep_0", "ep_1"]
    assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in [ep, other, *batch, *fam])
    assert not {o["meta_info"]["id"] for o in fam} & {"fam", "fam_0", "fam_1"}


def test_an_infinite_temperature_is_refused():
    """SGLang (sampling/sampling_params.py, SamplingParams.verify) refuses a temperature that is not a finite number
    >= 0. JSON's Infinity (which Python's json reads) passed the hf server's ">= 0" and sampled uniformly."""
    from areal_hpc.inference.http_validate import RequestError, engine_sampling_params

    with pytest.raises(RequestError, match="temperature"):
        engine_sampling_params({"temperature": float("inf")})


def test_a_disk_update_without_a_weight_version_keeps_the_version(engine, model_path):
    """SGLang 0.5.23 (managers/tokenizer_manager.py, update_weights_from_disk) sets the weight version only when the
    request names one (`_update_weight_version_if_provided`), as the hf server's distributed update does. Its disk
    update made one up (the old one + 1): a client that updates without a version, then names it with
    /update_weight_version or keeps serving version N, got tokens labelled N+1."""
    import asyncio

    import aiohttp

    from areal_hpc.inference.http_server import EngineServer

    async def go():
        async with engine_app(EngineServer(engine)) as url, aiohttp.ClientSession() as s:
            async with s.post(url + "/update_weights_from_disk", json={"model_path": model_path}) as r:
                body = await r.json()
            async with s.get(url + "/get_weight_version") as r:
                return body, (await r.json())["weight_version"]

    body, version = asyncio.run(go())
    assert body["success"] and version == "0" and engine.weight_version == "0", (body, version)
