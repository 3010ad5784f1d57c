"""Real `hf` servers as subprocesses (``areal-hpc serve``) on a tiny model:
HTTP contract, auth, numerics, batching, pause/resume, weight updates (disk and torch.distributed),
registry lifecycle, and the client pool under failures. CPU, about a minute.

Tests share one run with three servers and run in file order (later tests kill servers).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch

from areal_hpc.inference.client import ServerPool
from areal_hpc.registry import Registry
from areal_hpc.toy import resolve_model
from helpers import serve_argv

ROOT = Path(__file__).resolve().parents[1]
TTL_S = 1.5
HEARTBEAT_S = 0.3


def start_server(run_dir: Path, sid: str, model: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", AREAL_HPC_LOG_LEVEL="WARNING", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(run_dir / f"{sid}.log", "ab")
    return subprocess.Popen(
        serve_argv(run_dir, sid, f"server.model_path={model}", f"launcher.heartbeat_s={HEARTBEAT_S}",
                   f"launcher.ttl_s={TTL_S}"),
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))


class Cluster:
    def __init__(self, run_dir: Path, model: str):
        self.run_dir, self.model = run_dir, model
        self.reg = Registry(run_dir / "registry", ttl_s=TTL_S)
        self.key = self.reg.secret()
        self.procs = {}

    def start(self, *sids):
        for sid in sids:
            self.procs[sid] = start_server(self.run_dir, sid, self.model)

    def wait_ready(self, *sids, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.reg.list("servers")
            if all(live.get(s, {}).get("state") == "ready" for s in sids):
                return live
            for s in sids:
                if self.procs[s].poll() is not None:
                    raise AssertionError(f"server {s} exited: " + (self.run_dir / f"{s}.log").read_text()[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"servers {sids} not ready in {timeout}s")

    def addr(self, sid):
        return self.reg.get("servers", sid)["address"]

    def http(self, sid, method, path, payload=None, key=True, raw=None, timeout=60):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
        req = urllib.request.Request(f"http://{self.addr(sid)}{path}", data=data, method=method)
        if key:
            req.add_header("Authorization", f"Bearer {self.key if key is True else key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def kill_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            p.wait()


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("toy:qwen3-h128-l2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_path):
    c = Cluster(tmp_path_factory.mktemp("run"), model_path)
    c.start("s0", "s1", "s2")
    try:
        c.wait_ready("s0", "s1", "s2")
        yield c
    finally:
        c.kill_all()


@pytest.fixture(scope="module")
def reference(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def perturbed(model_path, cluster):
    """A second set of weights, published as a HF directory inside the run."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = cluster.run_dir / "weights" / "v1"
    m.save_pretrained(path)
    return m, path


def forward_logprobs(model, prompt, output, temperature):
    ids = torch.tensor([list(prompt) + list(output)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    n = len(prompt)
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits[n - 1:-1] / t, -1).gather(1, torch.tensor(output)[:, None])[:, 0]
    return lp, logits[n - 1:-1].argmax(-1).tolist()


def static_pool(cluster, *sids, **kw):
    pool = ServerPool(None, api_key=cluster.key, **kw)
    for s in sids:
        pool.add_server(s, cluster.addr(s))
    return pool


# ---------------------------------------------------------------------------------------------

def test_registration_record(cluster):
    rec = cluster.reg.get("servers", "s0")
    assert rec["backend"] == "hf" and rec["state"] == "ready" and rec["weight_version"] == 0
    assert rec["pid"] == cluster.procs["s0"].pid and rec["node"] and rec["address"].endswith(f":{rec['port']}")
    ports = {cluster.reg.get("servers", s)["port"] for s in ("s0", "s1", "s2")}
    assert len(ports) == 3  # started together, no port collision


def test_every_endpoint_needs_the_key(cluster):
    for method, path in (("GET", "/get_model_info"), ("POST", "/generate"),
                         ("POST", "/pause_generation"), ("POST", "/update_weights_from_disk"), ("GET", "/v1/models")):
        status, body = cluster.http("s0", method, path, {} if method == "POST" else None, key=False)
        assert status == 401 and "API key" in body["error"]["message"], (path, status)
        status, _ = cluster.http("s0", method, path, {} if method == "POST" else None, key="wrong")
        assert status == 401
    assert cluster.http("s0", "GET", "/health")[0] == 200
    assert cluster.http("s0", "GET", "/health_generate")[0] == 200
    for path in ("/health", "/health_generate", "/ready"):  # as SGLang (utils/auth.py): probes need no secret
        for key in (False, "wrong"):
            assert cluster.http("s0", "GET", path, key=key)[0] == 200, (path, key)
    status, info = cluster.http("s0", "GET", "/get_server_info")
    assert status == 200 and info["backend"] == "hf" and info["weight_version"] == "0"
    status, models = cluster.http("s0", "GET", "/v1/models")
    assert status == 200 and models["data"][0]["max_model_len"] == 2048
    assert cluster.http("s0", "POST", "/flush_cache", {})[0] == 200


def test_malformed_requests_get_4xx_with_a_reason(cluster):
    bad = [
        ("/generate", b"{not json", "valid JSON"),
        ("/generate", b"[1, 2]", "JSON object"),
        ("/generate", b"{}", "input_ids"),
        ("/generate", json.dumps({"text": "hi", "input_ids": [1]}).encode(), "either text or input_ids"),
        ("/generate", json.dumps({"input_ids": [1], "top_logprobs_num": 5}).encode(), "'top_logprobs_num'"),
        ("/generate", json.dumps({"input_ids": [1], "logprob_start_len": 0}).encode(), "'logprob_start_len'"),
        ("/generate", json.dumps({"input_ids": [1], "image_data": "x.png"}).encode(), "'image_data'"),
        ("/generate", json.dumps({"input_ids": [1], "lora_path": "/a"}).encode(), "'lora_path'"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"n": 0}}).encode(), "n must be"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"sampling_seed": 3}}).encode(),
         "sampling_seed"),
        ("/generate", json.dumps({"input_ids": []}).encode(), "non-empty"),
        ("/generate", json.dumps({"input_ids": [1, 10 ** 6]}).encode(), "vocabulary"),
        ("/generate", json.dumps({"input_ids": [-1]}).encode(), "vocabulary"),
        ("/generate", json.dumps({"input_ids": ["a"]}).encode(), "integers"),
        ("/generate", json.dumps({"input_ids": [1] * 2048}).encode(), "context length"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": -3}}).encode(), ">= 0"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"temperature": -1}}).encode(), ">= 0"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"top_p": 2}}).encode(), "top_p"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"top_p": 10 ** 400}}).encode(), "top_p"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"nope": 1}}).encode(), "unknown"),
        ("/generate", json.dumps({"input_ids": [1], "sampling_params": "x"}).encode(), "object"),
        # one value for a whole batch request: not the last prompt's, silently
        *(("/generate", json.dumps({"input_ids": [[1], [2]], "sampling_params": [{key: a}, {key: b}]}).encode(),
           f"sampling_params.{key} must be the same for every prompt of a batch request")
          for key, a, b in (("stream_interval", 1, 4), ("skip_special_tokens", True, False), ("n", 1, 2))),
        # null is every default, not the other prompts' values
        *(("/generate", json.dumps({"input_ids": [[1], [2]], "sampling_params": [{key: b}, None]}).encode(),
           f"sampling_params.{key} must be the same for every prompt of a batch request")
          for key, b in (("stream_interval", 4), ("skip_special_tokens", False), ("n", 2))),
        ("/pause_generation", json.dumps({"mode": "sideways"}).encode(), "mode"),
        ("/abort_request", b"{}", "rid"),
        ("/update_weights_from_disk", b"{}", "model_path"),
        ("/update_weights_from_disk", json.dumps({"model_path": "/no/such/dir"}).encode(), "/no/such/dir"),
        ("/update_weights_from_distributed", json.dumps({"names": []}).encode(), "not initialized"),
        ("/init_weights_update_group", json.dumps({"master_address": "x"}).encode(), "master_port"),
    ]
    for path, raw, reason in bad:
        status, body = cluster.http("s0", "POST", path, raw=raw)
        assert 400 <= status < 500, (path, raw, status, body)
        assert reason in body["message"], (path, raw, body["message"])
    assert cluster.http("s0", "GET", "/no_such_endpoint")[0] == 404
    status, body = cluster.http("s0", "POST", "/generate",
                                {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}})
    assert status == 200 and len(body["output_ids"]) == 2  # still serving
    assert cluster.procs["s0"].poll() is None


def test_generate_contract_and_logprobs_match_forward_pass(cluster, reference):
    status, body = cluster.http("s0", "POST", "/generate", {
        "input_ids": [5, 6, 7], "return_logprob": True, "rid": "r1",
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}})
    assert status == 200
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6} and meta["id"] == "r1"
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 6 and meta["weight_version"] == "0"
    assert [t for _, t, _ in meta["output_token_logprobs"]] == body["output_ids"]
    assert all(x[2] is None for x in meta["output_token_logprobs"])
    # batch input, SGLang style
    status, both = cluster.http("s0", "POST", "/generate", {"input_ids": [[5, 6], [7]],
                                                           "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(both, list) and len(both) == 2

    cases = [([3, 4, 5, 6], 0.0, -1, 1.0), ([9] * 13, 1.0, -1, 1.0), ([7, 8], 0.7, 5, 0.9),
             ([3 + i % 15 for i in range(37)], 1.3, -1, 0.8), ([11], 0.0, -1, 1.0)]

    async def main():
        async with static_pool(cluster, "s0", "s1", "s2") as pool:
            return await asyncio.gather(*(
                pool.generate(p, {"max_new_tokens": 40, "temperature": t, "top_k": k, "top_p": tp,
                                  "ignore_eos": True}) for p, t, k, tp in cases))

    for (prompt, t, _, _), res in zip(cases, asyncio.run(main())):
        assert len(res.output_ids) == 40 == len(res.logprobs) == len(res.versions)
        ref, greedy = forward_logprobs(reference, prompt, res.output_ids, t)
        got = torch.tensor(res.logprobs)
        assert torch.allclose(got, ref, atol=1e-4), (ref - got).abs().max()
        if t == 0:
            assert greedy == res.output_ids
        assert set(res.versions) == {0}


def _sse(cluster, sid, payload):
    """POST a streaming /generate; the decoded ``data:`` events (``[DONE]`` kept as a string)."""
    req = urllib.request.Request(f"http://{cluster.addr(sid)}/generate", data=json.dumps(payload).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {cluster.key}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_text_stream_and_n_match_the_token_id_path(cluster, model_path):
    """A generic SGLang client's requests (text, stream, n > 1) give what the token-id path gives (greedy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompt = "12+34="
    ids = tok.encode(prompt)
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    status, ref = cluster.http("s0", "POST", "/generate", {"input_ids": ids, "sampling_params": sp,
                                                           "return_logprob": True})
    assert status == 200 and "text" not in ref  # token ids in, the skip-tokenizer shape out
    ref_lp = [x[0] for x in ref["meta_info"]["output_token_logprobs"]]

    # text in: same tokens, plus SGLang's "text"
    status, got = cluster.http("s0", "POST", "/generate", {"text": prompt, "sampling_params": sp,
                                                           "return_logprob": True})
    assert status == 200 and got["output_ids"] == ref["output_ids"] and got["meta_info"]["prompt_tokens"] == len(ids)
    assert got["text"] == tok.decode(ref["output_ids"], skip_special_tokens=True)
    assert max(abs(a - x[0]) for a, x in zip(ref_lp, got["meta_info"]["output_token_logprobs"])) < 1e-5
    status, batch = cluster.http("s0", "POST", "/generate", {"text": [prompt, "7*8="], "sampling_params": sp})
    assert status == 200 and [b["output_ids"] for b in batch][0] == ref["output_ids"] and len(batch) == 2

    # n > 1: a list of n, prompt-major for a batch
    status, many = cluster.http("s0", "POST", "/generate", {"input_ids": ids, "sampling_params": {**sp, "n": 3},
                                                            "return_logprob": True})
    assert status == 200 and isinstance(many, list) and len(many) == 3
    assert all(m["output_ids"] == ref["output_ids"] for m in many) and len({m["meta_info"]["id"] for m in many}) == 3
    status, grid = cluster.http("s0", "POST", "/generate", {"input_ids": [ids, [5, 6]],
                                                            "sampling_params": {**sp, "n": 2}})
    assert status == 200 and len(grid) == 4 and grid[0]["output_ids"] == grid[1]["output_ids"] == ref["output_ids"]
    assert grid[2]["output_ids"] == grid[3]["output_ids"] != ref["output_ids"]

    # stream: cumulative chunks that end with the non-streamed answer, then [DONE]
    events = _sse(cluster, "s0", {"input_ids": ids, "sampling_params": sp, "return_logprob": True, "stream": True})
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = events[:-1]
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths == sorted(lengths) and lengths[-1] == 12 and lengths[0] < 12
    assert all(c["output_ids"] == ref["output_ids"][:len(c["output_ids"])] for c in chunks)
    assert chunks[-1]["output_ids"] == ref["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert [x[0] for x in chunks[-1]["meta_info"]["output_token_logprobs"]] == pytest.approx(ref_lp, abs=1e-5)
    # streamed text with n = 2: chunks carry "index"; each sample ends with the reference text
    events = _sse(cluster, "s1", {"text": prompt, "sampling_params": {**sp, "n": 2, "stream_interval": 4},
                                  "stream": True})
    assert events[-1] == "[DONE]"
    last = {}
    for c in events[:-1]:
        last[c["index"]] = c
    assert sorted(last) == [0, 1] and all(c["text"] == got["text"] for c in last.values())


def test_greedy_is_deterministic(cluster):
    req = {"input_ids": [4, 8, 15, 16, 2, 12], "return_logprob": True,
           "sampling_params": {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}}
    outs = [cluster.http(s, "POST", "/generate", req)[1] for s in ("s0", "s0", "s1")]
    assert outs[0]["output_ids"] == outs[1]["output_ids"] == outs[2]["output_ids"]
    lp = [[x[0] for x in o["meta_info"]["output_token_logprobs"]] for o in outs]
    assert max(abs(a - b) for a, b in zip(lp[0], lp[2])) < 1e-5


def test_concurrent_requests_are_batched(cluster):
    params = {"max_new_tokens": 64, "temperature": 1.0, "ignore_eos": True}
    n = 16

    async def main():
        async with static_pool(cluster, "s0") as pool:
            await pool.generate([3, 4], params)  # warm
            t0 = time.perf_counter()
            for _ in range(2):
                await pool.generate([3, 4, 5], params)
            single = (time.perf_counter() - t0) / 2
            t0 = time.perf_counter()
            res = await asyncio.gather(*(pool.generate([3 + i % 15, 4, 5], params) for i in range(n)))
            return single, time.perf_counter() - t0, res

    single, together, res = asyncio.run(main())
    assert all(len(r.output_ids) == 64 for r in res)
    assert together < n * single / 4, f"{n} concurrent took {together:.3f}s, one alone {single:.3f}s"


def test_pause_aborts_running_holds_new_and_continue_resumes(cluster, reference):
    async def post(session, path, payload):
        async with session.post(f"http://{cluster.addr('s0')}{path}", json=payload,
                                headers={"Authorization": f"Bearer {cluster.key}"}) as r:
            return r.status, await r.json()

    async def raw_http():
        async with aiohttp.ClientSession() as s:
            long = [asyncio.create_task(post(s, "/generate", {
                "input_ids": [3 + i, 5], "return_logprob": True,
                "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}})) for i in range(2)]
            while (await post(s, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 0}})) and \
                    cluster.http("s0", "GET", "/get_server_info")[1]["internal_states"][0]["num_running"] < 2:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            status, body = await post(s, "/pause_generation", {})
            assert status == 200 and body["status"] == "ok"
            aborted = await asyncio.gather(*long)
            held = asyncio.create_task(post(s, "/generate", {"input_ids": [9], "sampling_params": {"max_new_tokens": 3,
                                                                                               "ignore_eos": True}}))
            await asyncio.sleep(0.3)
            assert not held.done(), "requests sent while paused wait for continue"
            assert cluster.http("s0", "GET", "/get_server_info")[1]["internal_states"][0]["paused"]
            assert (await post(s, "/continue_generation", {}))[0] == 200
            assert len((await held)[1]["output_ids"]) == 3
            return aborted

    for status, body in asyncio.run(raw_http()):
        assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(body["output_ids"]) < 1500

    # through the pool: interrupted generations are resumed to their full length
    prompts = [[3 + i, 7, 9] for i in range(4)]

    async def pooled():
        async with static_pool(cluster, "s0") as pool:
            tasks = [asyncio.create_task(pool.generate(p, {"max_new_tokens": 600, "temperature": 1.0,
                                                              "ignore_eos": True})) for p in prompts]
            while cluster.http("s0", "GET", "/get_server_info")[1]["internal_states"][0]["num_running"] < 4:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            res = await pool.pause_all()
            assert all(r.ok for r in res.values())
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in tasks)
            await pool.continue_all()
            return await asyncio.gather(*tasks)

    for prompt, res in zip(prompts, asyncio.run(pooled())):
        assert len(res.output_ids) == 600 and res.finish_reason == "length"
        assert res.n_requests >= 2, "the pause must have interrupted this request"
        ref, _ = forward_logprobs(reference, prompt, res.output_ids, 1.0)
        assert torch.allclose(torch.tensor(res.logprobs), ref, atol=1e-4)


def test_update_weights_from_disk_changes_outputs_and_version(cluster, reference, perturbed, model_path):
    model, path = perturbed
    req = {"input_ids": [5, 9, 13], "return_logprob": True,
           "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
    before = cluster.http("s0", "POST", "/generate", req)[1]
    status, body = cluster.http("s0", "POST", "/update_weights_from_disk", {"model_path": str(path),
                                                                          "weight_version": "1"})
    assert status == 200 and body["success"], body
    after = cluster.http("s0", "POST", "/generate", req)[1]
    assert after["meta_info"]["weight_version"] == "1" and before["meta_info"]["weight_version"] == "0"
    assert after["output_ids"] != before["output_ids"]
    lp, greedy = forward_logprobs(model, [5, 9, 13], after["output_ids"], 0)
    assert greedy == after["output_ids"]
    assert torch.allclose(torch.tensor([x[0] for x in after["meta_info"]["output_token_logprobs"]]), lp, atol=1e-4)
    deadline = time.monotonic() + 3
    while cluster.reg.get("servers", "s0")["weight_version"] != 1:
        assert time.monotonic() < deadline, "the registry record must follow the weight version"
        time.sleep(0.05)

    async def fan_out():
        async with static_pool(cluster, "s0", "s1", "s2") as pool:
            return await pool.update_weights_from_disk(cluster.run_dir / "missing", 9)

    res = asyncio.run(fan_out())
    assert set(res) == {"s0", "s1", "s2"} and not any(r.ok for r in res.values())
    assert all("missing" in r.error for r in res.values())
    # back to the original weights for the tests that follow
    status, body = cluster.http("s0", "POST", "/update_weights_from_disk", {"model_path": model_path,
                                                                          "weight_version": 2})
    assert status == 200 and cluster.http("s0", "POST", "/generate", req)[1]["output_ids"] == before["output_ids"]


def test_update_weights_from_distributed_gloo(cluster, perturbed, model_path):
    import torch.distributed as dist

    from areal_hpc.inference.hf_engine.model_runner import init_custom_process_group

    model, _ = perturbed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names, tensors = zip(*[(n, p.detach().contiguous()) for n, p in model.named_parameters()])
    payload = {"names": list(names), "dtypes": [str(t.dtype).replace("torch.", "") for t in tensors],
               "shapes": [list(t.shape) for t in tensors], "group_name": "g", "weight_version": "5"}

    probe = {"input_ids": [5, 9, 13], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {cluster.key}"}) as sess:
            url = f"http://{cluster.addr('s1')}"

            async def post(path, body):
                async with sess.post(url + path, json=body) as r:
                    return r.status, await r.json()

            init = asyncio.create_task(post("/init_weights_update_group", {
                "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                "backend": "gloo", "group_name": "g"}))
            pg = await asyncio.to_thread(init_custom_process_group, "gloo", f"tcp://127.0.0.1:{port}", 2, 0, "g", 60)
            assert (await init)[0] == 200
            for dtype in ("auto", "int4x"):  # a dtype the trainer cannot have broadcast: refused before any receive
                bad = dict(payload, dtypes=[dtype] * len(names))
                status, body = await post("/update_weights_from_distributed", bad)
                assert status == 400 and f"unknown dtype {dtype!r}" in body["message"], body
            # Tensors this model does not have, or not in that shape: the server joins the broadcast (else the trainer
            # waits in it for the group's timeout), drops what it received, and says why; its weights stay as they were
            async def generated():
                status, out = await post("/generate", probe)
                return status, out["output_ids"], out["meta_info"]["weight_version"]

            before = await generated()
            wrong = [torch.zeros(3, 5), torch.zeros(*tensors[0].shape[:-1], tensors[0].shape[-1] + 1)] + list(tensors)
            bad = dict(payload, names=["lm_head.nope", names[0]] + list(names), dtypes=["float32"] * len(wrong),
                       shapes=[list(t.shape) for t in wrong])
            upd = asyncio.create_task(post("/update_weights_from_distributed", bad))
            sent = asyncio.to_thread(lambda: [dist.broadcast(t, src=0, group=pg) for t in wrong])
            await asyncio.wait_for(sent, 30)
            status, body = await upd
            assert status == 400 and not body["success"] and "unexpected tensor 'lm_head.nope'" in body["message"]
            assert f"{names[0]}: shape" in body["message"], body
            assert await generated() == before
            upd = asyncio.create_task(post("/update_weights_from_distributed", payload))
            await asyncio.to_thread(lambda: [dist.broadcast(t, src=0, group=pg) for t in tensors])
            status, body = await upd
            assert status == 200 and body["success"], body
            assert (await post("/destroy_weights_update_group", {"group_name": "g"}))[0] == 200
            dist.destroy_process_group(pg)

    asyncio.run(main())
    req = {"input_ids": [5, 9, 13], "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
    out = cluster.http("s1", "POST", "/generate", req)[1]
    _, greedy = forward_logprobs(model, [5, 9, 13], out["output_ids"], 0)
    assert greedy == out["output_ids"] and out["meta_info"]["weight_version"] == "5"
    assert cluster.http("s1", "POST", "/update_weights_from_disk", {"model_path": model_path})[0] == 200


def test_pool_survives_a_killed_server_and_picks_up_a_late_one(cluster):
    params = {"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}

    async def main():
        async with ServerPool(cluster.reg, refresh_s=HEARTBEAT_S) as pool:
            assert set(pool.servers) == {"s0", "s1", "s2"}
            cluster.start("s3")  # joins while the pool runs
            sem = asyncio.Semaphore(24)

            async def one(i):
                async with sem:
                    return await pool.generate([3 + i % 15, 4], params)

            async def killer():
                # kill s2 mid-load: once requests are running on it (not after a fixed time, which a
                # busy machine may reach before s2 got any)
                deadline = time.monotonic() + 60
                while pool.servers["s2"]["inflight"] == 0:
                    assert time.monotonic() < deadline, "s2 never got a request"
                    await asyncio.sleep(0.01)
                busy = pool.servers["s2"]["inflight"]
                os.killpg(cluster.procs["s2"].pid, signal.SIGKILL)
                return busy

            busy, *results = await asyncio.gather(killer(), *(one(i) for i in range(240)))
            assert busy > 0  # requests were running on s2 when it died ...
            assert all(len(r.output_ids) == 24 for r in results)  # ... and every request still completed
            await asyncio.to_thread(cluster.wait_ready, "s3")
            deadline = time.monotonic() + 5
            while "s3" not in pool.servers or "s2" in pool.servers:
                assert time.monotonic() < deadline, pool.servers
                await asyncio.sleep(0.05)
            late = await asyncio.gather(*(one(i) for i in range(48)))
            return pool.stats, late

    stats, late = asyncio.run(main())
    assert any("s3" in r.server_ids for r in late), "the late server gets traffic"
    assert not any("s2" in r.server_ids for r in late)
    assert cluster.procs["s2"].wait(5) == -signal.SIGKILL
    # a SIGKILLed server cannot deregister: its record stays on disk but is dead (TTL)
    assert cluster.reg.path("servers", "s2").exists()
    assert "s2" not in cluster.reg.list("servers")


def test_sigterm_deregisters_at_once(cluster):
    path = cluster.reg.path("servers", "s1")
    assert path.exists()
    cluster.procs["s1"].send_signal(signal.SIGTERM)
    assert cluster.procs["s1"].wait(15) == 0
    assert not path.exists(), "a signalled server removes its own record"
    assert set(cluster.reg.list("servers")) == {"s0", "s3"}


# fix8-D
def test_a_new_weight_update_group_replaces_the_old_ones(cluster):
    """A restarted trainer (or one whose servers changed) forms its group anew under a new name: the server destroys
    the groups before it (with NCCL each would keep its communicator's memory) and keeps the new one."""
    import torch.distributed as dist

    from areal_hpc.inference.hf_engine.model_runner import init_custom_process_group

    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {cluster.key}"}) as sess:
            async def post(path, body):
                async with sess.post(f"http://{cluster.addr('s0')}{path}", json=body) as r:
                    return r.status, await r.json()

            groups = []
            for name in ("fix8-old", "fix8-new"):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                init = asyncio.create_task(post("/init_weights_update_group", {
                    "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                    "backend": "gloo", "group_name": name}))
                groups.append(await asyncio.to_thread(
                    init_custom_process_group, "gloo", f"tcp://127.0.0.1:{port}", 2, 0, name, 60))
                assert (await init)[0] == 200
            try:
                status, body = await post("/destroy_weights_update_group", {"group_name": "fix8-old"})
                assert status == 400 and "no group fix8-old" in body["message"], body
                assert (await post("/destroy_weights_update_group", {"group_name": "fix8-new"}))[0] == 200
            finally:
                for pg in groups:
                    dist.destroy_process_group(pg)

    asyncio.run(main())


def test_a_request_cut_by_a_stopping_server_is_resent_to_another(cluster):
    """A server that is signalled aborts its running requests so that clients resume them elsewhere; the resent request
    went back to the same server (it then had the fewest in flight), to be cut again: a wasted round trip each."""
    cluster.start("s4")
    cluster.wait_ready("s4")
    sent = []  # (server, finish reason or error) of every /generate, in order

    class Watched(ServerPool):
        async def _post_generate(self, server, payload, samples=1):
            try:
                body = await super()._post_generate(server, payload, samples)
            except Exception as e:
                sent.append((server.id, type(e).__name__))
                raise
            sent.append((server.id, body["meta_info"]["finish_reason"]["type"]))
            return body

    async def main():
        params = {"max_new_tokens": 1500, "temperature": 1.0, "ignore_eos": True}
        async with Watched(None, api_key=cluster.key) as pool:
            for s in ("s0", "s4"):
                pool.add_server(s, cluster.addr(s))
            tasks = [asyncio.create_task(pool.generate([3 + i, 4], params)) for i in range(4)]
            deadline = time.monotonic() + 60
            while pool.servers["s4"]["inflight"] < 2:
                assert time.monotonic() < deadline, pool.servers
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # generating
            cluster.procs["s4"].send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert cluster.procs["s4"].wait(15) == 0
    assert all(len(r.output_ids) == 1500 for r in results)
    cut = next(i for i, (sid, how) in enumerate(sent) if sid == "s4" and how == "abort")
    assert [sid for sid, _ in sent[cut:]].count("s4") == 2, sent  # the two cut there, none resent there
