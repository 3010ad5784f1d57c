"""ServerPool against scripted in-process HTTP servers: resumption, pause, retries, 4xx, discovery,
fan-out, least-load routing. No model, no subprocess: about a second."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import pytest
from aiohttp import web

from areal_hpc.inference.client import PoolError, RequestRejected, ServerPool
from areal_hpc.registry import Registry


class Fake:
    """A scripted SGLang-like server. ``script(payload) -> (status, body)`` or a coroutine."""

    def __init__(self, script):
        self.script = script
        self.calls = []
        self.runner = None
        self.port = None

    async def start(self):
        async def handle(request):
            payload = json.loads(await request.read() or b"{}")
            self.calls.append((request.path, payload, request.headers.get("Authorization")))
            res = self.script(request.path, payload)
            if asyncio.iscoroutine(res):
                res = await res
            status, body = res
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    async def stop(self):
        await self.runner.cleanup()


def gen_body(ids, reason="length", version="0", spans=None):
    meta = {"finish_reason": {"type": reason}, "prompt_tokens": 1, "completion_tokens": len(ids),
            "weight_version": version, "output_token_logprobs": [[-0.1 * (i + 1), t, None] for i, t in enumerate(ids)]}
    if spans is not None:
        meta["weight_versions"] = spans
    return {"output_ids": ids, "meta_info": meta}


def run(coro):
    return asyncio.run(coro)


def test_abort_is_resumed_with_prefix_and_remaining_budget():
    async def main():
        def script(path, p):
            if len(p["input_ids"]) == 3:  # first attempt: aborted after 2 tokens, version changes inside
                return 200, gen_body([10, 11], "abort", "3", spans=[{"version": "3", "start": 0, "end": 2}])
            return 200, gen_body(list(range(20, 20 + p["sampling_params"]["max_new_tokens"])), "length", "4")

        srv = await Fake(script).start()
        async with ServerPool(None, api_key="key") as pool:
            pool.add_server("a", srv.address)
            res = await pool.generate([1, 2, 3], {"max_new_tokens": 6, "temperature": 0.5})
        await srv.stop()
        assert res.output_ids == [10, 11, 20, 21, 22, 23]
        assert res.versions == [3, 3, 4, 4, 4, 4]
        assert len(res.logprobs) == 6 and res.finish_reason == "length" and res.n_requests == 2
        second = srv.calls[1][1]
        assert second["input_ids"] == [1, 2, 3, 10, 11]
        assert second["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.5}
        assert srv.calls[0][2] == "Bearer key"

    run(main())


def test_group_is_one_request_and_aborted_samples_resume_alone():
    async def main():
        def script(path, p):
            sp = p["sampling_params"]
            if sp.get("n") == 3:  # the group: one sample done, one aborted after a token, one aborted empty
                return 200, [gen_body([5, 6], "stop", "2"), gen_body([7], "abort", "2"), gen_body([], "abort", "2")]
            return 200, gen_body([9] * sp["max_new_tokens"], "length", "3")

        srv = await Fake(script).start()
        async with ServerPool(None, api_key="key") as pool:
            pool.add_server("a", srv.address)
            res = await pool.generate_group([1, 2], 3, {"max_new_tokens": 3})
        await srv.stop()
        assert [r.output_ids for r in res] == [[5, 6], [7, 9, 9], [9, 9, 9]]
        assert [r.versions for r in res] == [[2, 2], [2, 3, 3], [3, 3, 3]]
        assert [r.finish_reason for r in res] == ["stop", "length", "length"]
        assert [r.n_requests for r in res] == [1, 2, 2] and all(len(r.logprobs) == len(r.output_ids) for r in res)
        first, *resumed = [c[1] for c in srv.calls]
        assert first["sampling_params"] == {"max_new_tokens": 3, "n": 3} and first["input_ids"] == [1, 2]
        assert sorted((c["input_ids"], c["sampling_params"]["max_new_tokens"]) for c in resumed) == \
            [([1, 2], 3), ([1, 2, 7], 2)]
        assert all("n" not in c["sampling_params"] for c in resumed)

    run(main())


def test_group_falls_back_to_single_samples_when_its_request_fails():
    async def main():
        def script(path, p):
            if p["sampling_params"].get("n"):
                return 503, {"error": "overloaded"}
            return 200, gen_body([4], "stop")

        srv, other = await Fake(script).start(), await Fake(script).start()
        async with ServerPool(None, api_key="key") as pool:
            pool.add_server("a", srv.address)
            pool.add_server("b", other.address)
            res = await pool.generate_group([1], 2, {"max_new_tokens": 1})
        await srv.stop()
        await other.stop()
        assert [r.output_ids for r in res] == [[4], [4]]
        assert sum(1 for f in (srv, other) for c in f.calls if c[1]["sampling_params"].get("n") == 2) == 1

    run(main())


def test_a_group_that_fails_leaves_none_of_its_samples_generating():
    """One sample's resumption is rejected (4xx): the episode fails, but its other sample went on generating on the
    server, unseen by the controller (beyond rollout.max_concurrent_rollouts), until its max_new_tokens."""
    async def main():
        release, resumes = asyncio.Event(), []

        async def script(path, p):
            if p["sampling_params"].get("n") == 2:  # both samples aborted by a pause, before any token
                return 200, [gen_body([], "abort"), gen_body([], "abort")]
            resumes.append(p)
            if len(resumes) == 1:
                return 400, {"message": "input is longer than the context"}
            await release.wait()  # a long generation
            return 200, gen_body([1], "stop")

        srv = await Fake(script).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", srv.address)
            with pytest.raises(RequestRejected, match="longer than the context"):
                await pool.generate_group([1, 2], 2, {"max_new_tokens": 4})
            await asyncio.sleep(0.3)
            still = pool.servers["a"]["inflight"]
        release.set()
        await srv.stop()
        assert still == 0, f"{still} sample(s) of the failed group still generating"

    run(main())


def test_paused_pool_holds_resumption_until_resume():
    async def main():
        release = asyncio.Event()

        async def script(path, p):
            if path != "/generate":
                return 200, {"status": "ok"}
            if len(p["input_ids"]) == 1:  # in flight when the pause comes: returns aborted
                await release.wait()
                return 200, gen_body([7], "abort")
            return 200, gen_body([8] * p["sampling_params"]["max_new_tokens"], "stop")

        srv = await Fake(script).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", srv.address)
            task = asyncio.create_task(pool.generate([1], max_new_tokens=3))
            while not srv.calls:
                await asyncio.sleep(0.01)
            res = await pool.pause_all()
            assert res["a"].ok and pool.paused
            release.set()
            await asyncio.sleep(0.2)
            gens = [c for c in srv.calls if c[0] == "/generate"]
            assert not task.done() and len(gens) == 1, "an aborted request must wait while paused"
            late = asyncio.create_task(pool.generate([1, 2], max_new_tokens=1))
            await asyncio.sleep(0.1)
            assert not late.done() and len([c for c in srv.calls if c[0] == "/generate"]) == 1
            await pool.continue_all()
            out = await task
            assert out.output_ids == [7, 8, 8] and out.finish_reason == "stop" and out.n_requests == 2
            assert (await late).output_ids == [8]
        await srv.stop()

    run(main())


@pytest.mark.parametrize("ours", [True, False])
def test_only_an_abort_without_our_pause_backs_off(monkeypatch, ours):
    """An abort our `pause_all` caused is resent at once, even when its reply comes after `continue_all`; one nobody
    here asked for (another client paused the server, it is shutting down) backs off before it is sent again."""
    real_sleep, backoffs = asyncio.sleep, []

    def sleep(delay, *a, **k):
        if sys._getframe(1).f_code.co_name == "_continue":
            backoffs.append(delay)
        return real_sleep(delay, *a, **k)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def main():
        release = asyncio.Event()

        async def script(path, p):
            if path == "/generate" and not release.is_set():  # the first try: aborted with nothing generated
                await release.wait()
                return 200, gen_body([], "abort")
            return 200, (gen_body([8], "stop") if path == "/generate" else {"status": "ok"})

        srv = await Fake(script).start()
        async with ServerPool(None) as pool:
            pool.add_server("a", srv.address)
            task = asyncio.create_task(pool.generate([1], max_new_tokens=1))
            while not srv.calls:
                await real_sleep(0.01)
            if ours:  # the abort's reply arrives after the continue
                await pool.pause_all()
                await pool.continue_all()
            release.set()
            assert (await task).output_ids == [8]
        await srv.stop()

    run(main())
    assert (backoffs == []) if ours else (len(backoffs) == 1), backoffs


def test_retries_on_5xx_and_dead_server_then_rejects_4xx():
    async def main():
        bad = await Fake(lambda path, p: (500, {"message": "boom"})).start()
        good = await Fake(lambda path, p: (200, gen_body([1, 2]))).start()
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("bad", bad.address)
            pool.add_server("dead", f"127.0.0.1:{dead_port}")
            pool.add_server("good", good.address)
            results = await asyncio.gather(*(pool.generate([5], max_new_tokens=2) for _ in range(20)))
            assert all(r.output_ids == [1, 2] and r.server_ids == ["good"] for r in results)
            assert pool.stats["retries"] >= 2
            assert not pool.servers["bad"]["healthy"] and not pool.servers["dead"]["healthy"]
        rejecting = await Fake(lambda path, p: (400, {"error": {"message": "token id 99 is outside"},
                                                      "message": "token id 99 is outside"})).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("r", rejecting.address)
            with pytest.raises(RequestRejected, match="outside"):
                await pool.generate([99], max_new_tokens=2)
        for s in (bad, good, rejecting):
            await s.stop()

    run(main())


def test_least_loaded_routing_spreads_concurrent_requests():
    async def main():
        async def slow(path, p):
            await asyncio.sleep(0.05)
            return 200, gen_body([1])

        a, b = await Fake(slow).start(), await Fake(slow).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", a.address)
            pool.add_server("b", b.address)
            await asyncio.gather(*(pool.generate([1], max_new_tokens=1) for _ in range(40)))
        assert abs(len(a.calls) - len(b.calls)) <= 2, (len(a.calls), len(b.calls))
        await a.stop()
        await b.stop()

    run(main())


def test_discovery_from_registry_adds_and_drops(tmp_path):
    async def main():
        reg = Registry(tmp_path / "registry", ttl_s=0.6)
        a = await Fake(lambda path, p: (200, gen_body([1]))).start()
        b = await Fake(lambda path, p: (200, gen_body([2]))).start()
        reg.put("servers", "a", {"address": a.address, "state": "ready"})
        reg.put("servers", "starting", {"address": "127.0.0.1:1", "state": "starting"})
        async with ServerPool(reg, refresh_s=0.1) as pool:
            assert set(pool.servers) == {"a"}  # "starting" is not routed to
            reg.put("servers", "b", {"address": b.address, "state": "ready"})
            t0 = time.monotonic()
            await pool.wait_for_servers(2, timeout_s=2)
            assert time.monotonic() - t0 < 0.5
            for _ in range(6):  # keep a alive, let b expire (no heartbeat)
                reg.touch("servers", "a")
                await asyncio.sleep(0.15)
            assert set(pool.servers) == {"a"}
            res = await pool.generate([1], max_new_tokens=1)
            assert res.server_ids == ["a"]
            fan = await pool.update_weights_from_disk("/w/v1", 1)
            assert fan["a"].ok and fan["a"].body["output_ids"] == [1]
            assert a.calls[-1][1] == {"model_path": "/w/v1", "weight_version": "1", "abort_all_requests": False}
        await a.stop()
        await b.stop()

    run(main())


def test_wait_for_servers_starts_the_pool(tmp_path):
    async def main():
        reg = Registry(tmp_path / "registry")
        pool = ServerPool(reg, refresh_s=0.1)  # not started: waiting starts it, as generate does
        try:
            with pytest.raises(PoolError, match="waited for 1 inference servers, found 0"):
                await pool.wait_for_servers(1, timeout_s=0.3)
        finally:
            await pool.close()

    run(main())


def test_fan_out_reports_failures():
    async def main():
        ok = await Fake(lambda path, p: (200, {"success": True, "message": "done"})).start()
        no = await Fake(lambda path, p: (400, {"success": False, "message": "no such dir"})).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("ok", ok.address)
            pool.add_server("no", no.address)
            pool.add_server("gone", "127.0.0.1:1")
            res = await pool.update_weights_from_disk("/nope", 2, timeout_s=5)
        assert res["ok"].ok and not res["no"].ok and res["no"].error == "no such dir"
        assert not res["gone"].ok and res["gone"].status is None and res["gone"].error
        await ok.stop()
        await no.stop()

    run(main())


def test_fan_out_to_named_servers_reports_those_not_in_the_pool():
    """A named server the pool no longer knows (its record expired) is a failure, not left out of the results:
    the trainer would otherwise announce a weight bucket to fewer servers than will receive it, and see no error."""
    async def main():
        ok = await Fake(lambda path, p: (200, {"success": True})).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("ok", ok.address)
            res = await pool.update_weights_from_distributed(["w"], ["float32"], [[1]], "g", 3, ["ok", "dropped"])
        assert res["ok"].ok and not res["dropped"].ok and "not in the pool" in res["dropped"].error
        await ok.stop()

    run(main())


def test_pause_all_starts_the_pool():
    async def main():
        srv = await Fake(lambda path, p: (200, {"status": "ok"})).start()
        pool = ServerPool(None, api_key="k")
        pool.add_server("a", srv.address)
        try:
            assert (await pool.pause_all())["a"].ok and pool.paused
        finally:
            await pool.close()
            await srv.stop()

    run(main())


# fix8-D, fix11-I
@pytest.mark.parametrize("bound", ["request_timeout_s", "disk_load_timeout_s"])
def test_disk_update_to_a_frozen_server_fails_within_its_bound(bound):
    """A server whose node froze keeps its connection open and never answers: the trainer's disk update must fail
    for it, not wait forever, and after a weight load's bound (`ServerPool.disk_load_timeout_s`) when that is
    shorter than the pool's request_timeout_s (a generation's, an hour by default), not stall the trainer that long."""
    async def main():
        mute = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never replies
        try:
            async with ServerPool(None, api_key="k", **({bound: 0.5} if bound == "request_timeout_s" else {})) as pool:
                if bound == "disk_load_timeout_s":
                    pool.disk_load_timeout_s = 0.5
                pool.add_server("frozen", f"127.0.0.1:{mute.getsockname()[1]}")
                res = await asyncio.wait_for(pool.update_weights_from_disk("/w/v2", 2), 10)
            assert not res["frozen"].ok and "Timeout" in res["frozen"].error
        finally:
            mute.close()

    run(main())


# fix13-N
def test_a_paused_server_whose_record_lapsed_during_the_pause_gets_the_update_and_its_continue(tmp_path):
    """Servers heartbeat on the shared filesystem that the weight load saturates: a record may lapse for a moment
    while the pool is paused. That server must still get the weights (the broadcast's announcement: else the
    broadcast waits for it) and `continue_all`; else it comes back paused and holds every generation routed to it
    (up to the request timeout, an hour)."""
    async def main():
        srv = await Fake(lambda path, p: (200, {"status": "ok"})).start()
        reg = Registry(tmp_path / "registry")
        reg.put("servers", "a", {"address": srv.address, "state": "ready"})
        async with ServerPool(reg, refresh_s=3600) as pool:
            await pool.pause_all()
            reg.delete("servers", "a")  # lapsed
            await pool.refresh()
            assert (await pool.update_weights_from_distributed(["w"], ["float32"], [[1]], "g", 3, ["a"]))["a"].ok
            assert (await pool.update_weights_from_disk("/w/v3", 3))["a"].ok
            await pool.continue_all()
            reg.put("servers", "a", {"address": srv.address, "state": "paused"})  # back
            await pool.refresh()
            assert set(pool.servers) == {"a"}
        assert [path for path, _, _ in srv.calls] == ["/pause_generation", "/update_weights_from_distributed",
                                                      "/update_weights_from_disk", "/continue_generation"]
        await srv.stop()

    run(main())


# fix14-Q
def test_a_continue_that_fails_once_is_asked_again():
    """/continue_generation to a live server fails once (a reset, a timeout): the server stays paused and holds every
    generation routed to it unless the pool asks again."""
    async def main():
        continues = []

        def script(path, payload):
            if path == "/continue_generation":
                continues.append(payload)
                return (503, {"error": "busy"}) if len(continues) == 1 else (200, {"status": "ok"})
            return 200, {"status": "ok"}

        srv = await Fake(script).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", srv.address)
            await pool.pause_all()
            res = await pool.continue_all()
        await srv.stop()
        assert res["a"].ok and len(continues) == 2, res

    run(main())


async def start_paused_pair():
    """Fake servers: `a` fails /continue_generation until ``state["continue_ok"]`` and, paused, holds each /generate
    (SGLang's is_pause_cond); `b` always serves."""
    unpaused, state = asyncio.Event(), {"continue_ok": False}

    async def stuck(path, p):
        if path == "/pause_generation":
            unpaused.clear()
        elif path == "/continue_generation":
            if not state["continue_ok"]:
                return 503, {"error": "busy"}
            unpaused.set()
        elif path == "/generate":
            await unpaused.wait()
            return 200, gen_body([1])
        return 200, {"status": "ok"}

    a = await Fake(stuck).start()
    b = await Fake(lambda path, p: (200, gen_body([2]) if path == "/generate" else {"status": "ok"})).start()
    return a, b, state


async def only_b_serves_until_a_continue_reaches_a(pool, state):
    outs = await asyncio.wait_for(asyncio.gather(*(pool.generate([5], max_new_tokens=1) for _ in range(6))), 5)
    assert all(o.server_ids == ["b"] for o in outs)
    state["continue_ok"] = True  # the next weight update's continue reaches it
    await pool.pause_all()
    assert (await pool.continue_all())["a"].ok
    outs = await asyncio.wait_for(asyncio.gather(*(pool.generate([5], max_new_tokens=1) for _ in range(6))), 5)
    assert {o.server_ids[0] for o in outs} == {"a", "b"}


def test_a_server_left_paused_by_failed_continues_gets_no_generations_until_a_continue_succeeds(caplog):
    """/continue_generation fails on every try (a busy tokenizer manager, a timeout): that server stays paused, and a
    paused SGLang holds each new /generate (up to the request timeout, an hour). The pool must say so and route
    around it until a later continue succeeds."""
    async def main():
        a, b, state = await start_paused_pair()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", a.address)
            pool.add_server("b", b.address)
            await pool.pause_all()
            res = await pool.continue_all()
            assert not res["a"].ok and res["b"].ok and not pool.paused
            assert any("a" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records), caplog.text
            await only_b_serves_until_a_continue_reaches_a(pool, state)
        await a.stop()
        await b.stop()

    run(main())


def test_a_server_left_paused_while_its_record_lapsed_gets_no_generations_when_it_comes_back(tmp_path):
    """Both at once: a paused server's record lapses (the weight load saturates the shared filesystem) and
    /continue_generation fails on every try. The pool forgot it was left paused: when its record came back it got
    generations again, and a paused server holds each one (up to the request timeout, an hour)."""
    async def main():
        a, b, state = await start_paused_pair()
        reg = Registry(tmp_path / "registry")
        reg.put("servers", "a", {"address": a.address, "state": "ready"})
        reg.put("servers", "b", {"address": b.address, "state": "ready"})
        async with ServerPool(reg, refresh_s=3600) as pool:
            await pool.pause_all()
            reg.delete("servers", "a")  # lapsed
            await pool.refresh()
            assert not (await pool.continue_all())["a"].ok
            reg.put("servers", "a", {"address": a.address, "state": "paused"})  # back, still paused
            await pool.refresh()
            await only_b_serves_until_a_continue_reaches_a(pool, state)
        await a.stop()
        await b.stop()

    run(main())


def test_an_empty_abort_nobody_here_caused_that_repeats_fails_the_sample_with_the_servers_message():
    """An older SGLang reports a request error (input too long) as finish_reason abort without a status_code, and
    answers so every time: the sample must fail with that message, not be resent forever."""
    async def main():
        def script(path, p):
            body = gen_body([], "abort")
            body["meta_info"]["finish_reason"]["message"] = "the input (5000 tokens) is longer than the context"
            return 200, body

        srv = await Fake(script).start()
        async with ServerPool(None) as pool:
            pool.add_server("a", srv.address)
            with pytest.raises(PoolError, match="longer than the context"):
                await asyncio.wait_for(pool.generate([1], max_new_tokens=4), 30)
        await srv.stop()
        assert 1 < len(srv.calls) <= 10

    run(main())


def test_a_group_cut_by_a_stopping_server_resumes_on_another():
    """A group's samples aborted by a server nobody here paused (it is shutting down) were resumed on that server,
    the least loaded once it had cut them, to be cut again; they go to another server."""
    async def main():
        def stopping(path, p):
            if p["sampling_params"].get("n") == 2:
                return 200, [gen_body([7], "abort"), gen_body([7], "abort")]
            return 200, gen_body([], "abort")  # a resend here is cut at once

        async def busy(path, p):
            await asyncio.sleep(0.3)
            return 200, gen_body([9] * p["sampling_params"]["max_new_tokens"], "length")

        a, b = await Fake(stopping).start(), await Fake(busy).start()
        async with ServerPool(None, api_key="k") as pool:
            pool.add_server("a", a.address)
            pool.add_server("b", b.address)
            other = asyncio.create_task(pool.generate([1], max_new_tokens=3))  # on b: a is the least loaded
            while not b.calls:
                await asyncio.sleep(0.01)
            res = await pool.generate_group([1, 2], 2, {"max_new_tokens": 3})
            await other
        await a.stop()
        await b.stop()
        assert [r.output_ids for r in res] == [[7, 9, 9]] * 2 and len(a.calls) == 1, a.calls

    run(main())
