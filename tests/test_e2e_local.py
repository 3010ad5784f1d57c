"""The whole product in mode=local: real `hf` servers, real trainer processes, the real CLI."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_until

from areal_hpc.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def submit(tmp_path, *overrides, timeout=600, check=True):
    cmd = [sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
           "stats.progress_bar=False", *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if check and p.returncode != 0:
        rd = next(tmp_path.glob("*/*/*"), None)
        logs = "".join(f"\n--- {f}\n" + f.read_text()[-3000:] for f in sorted((rd / "logs").glob("*"))) if rd else ""
        raise AssertionError(f"submit failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}{logs}")
    return p


def run_dir(tmp_path, exp="quickstart", trial="run0"):
    return next(tmp_path.glob(f"*/{exp}/{trial}"))


def metrics(rd):
    return read_metrics(rd / "metrics.jsonl")


def start_run(tmp_path, *overrides) -> subprocess.Popen:
    """`submit` in the background (the run's owner), for tests that act on a live run."""
    cmd = [sys.executable, "-m", "areal_hpc", "submit", QUICKSTART, f"cluster.fileroot={tmp_path}",
           "stats.progress_bar=False", "trainer.total_train_steps=100000", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)


def wait_for_steps(tmp_path, n: int, timeout_s: float = 300) -> Path:
    """The run directory, once its metrics hold ``n`` steps."""
    def ready():
        rd = next(tmp_path.glob("*/quickstart/run0"), None)
        return rd if rd and len(metrics(rd)) >= n else None

    return wait_until(ready, timeout_s, f"{n} steps in {tmp_path}", interval=0.5)


SMALL = ["rollout.batch_size=8", "rollout.n_samples=4", "saver.freq_steps=0"]


def assert_phases(rows, *named):
    """Every step's wall time is split into phases that add up to it, the ``named`` ones among them."""
    for r in rows:
        phases = {k: v for k, v in r.items() if k.startswith("phase/")}
        assert all(phases.get(f"phase/{n}", 0) > 0 for n in named), (named, phases)
        assert sum(phases.values()) == pytest.approx(r["step_time_s"], rel=1e-6, abs=1e-6), r


@pytest.mark.parametrize("bound", [0, 1, 4])
def test_staleness_bound_holds(tmp_path, bound):
    submit(tmp_path, *SMALL, f"rollout.max_head_offpolicyness={bound}", "trainer.total_train_steps=8",
           "rollout.gen.max_new_tokens=8", "rollout.gen.ignore_eos=True")
    rd = run_dir(tmp_path)
    rows = metrics(rd)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["staleness_max"] <= bound for r in rows), [r["staleness_max"] for r in rows]
    assert_phases(rows, "train", "logprob", "weight_publish", "weight_wait")
    # the disk update's write, pause and load run beside the next step, which reports them
    assert all(r["bg_phase/weight_pause"] > 0 and r["bg_phase/weight_load"] > 0 and r["servers_updated"] == 1
               for r in rows[1:]), rows
    # A batch takes the oldest groups that have finished: groups it passes over (still running, aborted by updates)
    # are dropped once too old, as many as a batch at once when one version's groups lag the next's. How many is up
    # to timing; what holds is that the count only grows and every drop is of a group past the bound.
    drops = [r["dropped_stale"] for r in rows]
    assert drops == sorted(drops), drops
    if drops[-1]:
        m = re.search(r"stale group\(s\): their oldest tokens come from weight version (\d+), the trainer is at version "
                      r"(\d+) with max_head_offpolicyness=(\d+)", (rd / "logs" / "trainer-0.log").read_text())
        assert m and int(m[2]) - int(m[1]) > bound == int(m[3]), (drops, m)
    if bound == 0:
        assert all(r["staleness_max"] == 0 for r in rows)
    else:  # generation really ran ahead of training
        assert max(r["staleness_max"] for r in rows) >= 1


def test_weight_update_resumes_long_generations(tmp_path):
    # One group per step, long generations, staleness 1: from the third step on, the trainer waits
    # for a group that started one version ago, so each weight update lands while the next group is
    # still generating: training a step on 2 x 1800 tokens is much quicker than generating them (one
    # group running per server: a margin that holds on a loaded 2-core CI machine). With a larger
    # bound the trainer may run several steps in a burst before new groups start, and then no
    # update falls inside a generation. Interrupted generations are resumed on
    # the new weights. A group's samples are one request (`sampling_params.n`) whose answer comes
    # when all of them end, so the server runs one group (two sequences) at a time: a sample
    # waiting behind an aborted sibling would hold the group back until it went stale.
    submit(tmp_path, "rollout.batch_size=1", "rollout.n_samples=2", "rollout.max_head_offpolicyness=1",
           "rollout.gen.max_new_tokens=1800", "rollout.gen.ignore_eos=True", "trainer.total_train_steps=8",
           "saver.freq_steps=0", "server.max_running_requests=2")
    rd = run_dir(tmp_path)
    rows = metrics(rd)
    assert all(r["completion_len_mean"] == 1800 for r in rows)
    assert max(r["mixed_version_frac"] for r in rows) > 0
    assert all(r["staleness_max"] <= 1 for r in rows)
    assert re.search(r"[1-9]\d* running request\(s\) aborted", (rd / "logs" / "server-0.log").read_text())


def test_broadcast_weight_updates_reach_two_servers_from_two_trainer_ranks(tmp_path):
    """The collective weight path (NCCL on GPUs) over gloo on CPU, in the shape of the 4-GPU run: two
    servers and two trainer ranks form one group and every step's weights reach both servers
    without a disk copy. With staleness 0 a step only takes rollouts generated at the trainer's
    latest version, so a server left behind would show up as stale or stall the run."""
    submit(tmp_path, *SMALL, "allocation_mode=hf:d2+fsdp:d2", "trainer.ppo.weight_update=gloo",
           "rollout.max_head_offpolicyness=0", "trainer.total_train_steps=5", "rollout.gen.max_new_tokens=8",
           "rollout.gen.ignore_eos=True", timeout=300)
    rd = run_dir(tmp_path)
    rows = metrics(rd)
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert all(r["servers_updated"] == 2 for r in rows)
    assert_phases(rows, "train", "weight_broadcast", "weight_pause")
    assert not any("phase/weight_load" in r or "phase/weight_publish" in r for r in rows)
    assert all(r["staleness_max"] == 0 and r["dropped_stale"] == 0 for r in rows)
    assert [p.name for p in (rd / "weights").glob("v*")] == ["v5"]  # the final weights only, written at the end
    assert "formed with 2 server(s)" in (rd / "logs" / "trainer-0.log").read_text()


@pytest.mark.parametrize("async_training", [True, False])
def test_sync_and_async_learn(tmp_path, async_training):
    # 80 steps, 10-step means: runs of the same code spread widely (60 steps, 5-step means: one CI
    # run gained +0.09, 12 others +0.15 to +0.30, with bit-identical training steps on CPU)
    submit(tmp_path, f"trainer.ppo.async_training={async_training}", "trainer.total_train_steps=80",
           "saver.freq_steps=0", timeout=900)
    r = [x["reward_mean"] for x in metrics(run_dir(tmp_path))]
    first, last = sum(r[:10]) / 10, sum(r[-10:]) / 10
    assert last > first + 0.1, (first, last)


def test_eval_only(tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)}) + "\n"
                            for a in range(4) for b in range(4))
                    + json.dumps({"prompt": "1+" * 40 + "1=", "answer": "1"}) + "\n")  # left out: too long
    p = submit(tmp_path, "trainer.type=null", "allocation_mode=hf:d2+eval", f"valid_dataset.path={data}",
               "valid_dataset.max_prompt_len=40", "rollout.n_samples=2", "experiment_name=ev")
    report = json.loads((run_dir(tmp_path, "ev") / "eval.json").read_text())
    assert report["n_prompts"] == 16 and report["n_samples"] == 2
    assert 0.0 <= report["accuracy"] <= 1.0 and "pass@2" in report
    assert "eval:" in p.stdout
    assert not (run_dir(tmp_path, "ev") / "checkpoints").exists()  # nothing was trained


def test_an_eval_in_a_trial_that_published_weights_evaluates_them_only_for_the_model_it_trained(tmp_path):
    """trainer.type=null in a trial that trained: its servers load the trial's weights/latest, not the model given.
    Given another model (here the quickstart's toy:qwen3-h128-l2 after an SFT of toy:qwen3-h64-l1), the server refused
    the published weights (they do not fit) and the evaluation waited 10 minutes for a server before failing; a model
    of the same shape was silently evaluated as the trial's weights. Now that is bad input; given the model the trial
    trained from, the run says it evaluates the trial's weights."""
    submit(tmp_path, "trainer.type=sft", "trainer.sft.model.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum-64",
           "trainer.sft.batch_size=8", "trainer.total_train_steps=1", "experiment_name=ev")
    ev = ["trainer.type=null", "allocation_mode=hf:d1+eval", "valid_dataset.path=toy:sum-8", "rollout.n_samples=1",
          "experiment_name=ev"]
    p = submit(tmp_path, *ev, timeout=120, check=False)
    assert p.returncode == 2 and "trainer.ppo.actor.path" in p.stderr and "trial_name" in p.stderr, (p.stdout, p.stderr)
    p = submit(tmp_path, *ev, "trainer.ppo.actor.path=toy:qwen3-h64-l1")
    rd = run_dir(tmp_path, "ev")
    assert json.loads((rd / "eval.json").read_text())["weight_versions"] == [1]
    assert f"this trial's published weights v1 ({rd / 'weights' / 'v1'})" in p.stdout, p.stdout


def test_sft_through_the_launcher(tmp_path):
    submit(tmp_path, "trainer.type=sft", "trainer.sft.model.path=toy:qwen3-h64-l1", "train_dataset.path=toy:sum-512",
           "trainer.sft.batch_size=32", "trainer.sft.model.optimizer.lr=2e-3", "trainer.total_train_steps=30",
           "experiment_name=sft")
    rd = run_dir(tmp_path, "sft")
    rows = metrics(rd)
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"] * 0.7
    assert_phases(rows, "data", "train")
    assert all(r["phase/metrics"] > 0 for r in rows[1:])  # writing step N's metrics is step N+1's time
    assert not list((rd / "logs").glob("server-*.log"))  # SFT starts no servers
    assert (rd / "weights" / "v30" / "config.json").exists()


def test_stop_and_status_on_a_local_run(tmp_path):
    owner = start_run(tmp_path, *SMALL)
    try:
        rd = wait_for_steps(tmp_path, 2)
        st = subprocess.run([sys.executable, "-m", "areal_hpc", "status", "--json", f"cluster.fileroot={tmp_path}",
                             "experiment_name=quickstart", "trial_name=run0"], capture_output=True, text=True)
        status = json.loads(st.stdout)
        assert status["mode"] == "local" and status["job"]["state"] == "RUNNING"
        assert len(status["servers"]) == 1 and status["servers"][0]["healthy"]
        assert status["trainer"]["step"] >= 1
        logs = subprocess.run([sys.executable, "-m", "areal_hpc", "logs", "trainer", "-n", "5",
                               f"cluster.fileroot={tmp_path}", "experiment_name=quickstart", "trial_name=run0"],
                              capture_output=True, text=True)
        assert "step" in logs.stdout
        stop = subprocess.run([sys.executable, "-m", "areal_hpc", "stop", f"cluster.fileroot={tmp_path}",
                               "experiment_name=quickstart", "trial_name=run0"], capture_output=True, text=True,
                              timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        owner.wait(60)
        # The trainer checkpointed on the way out; nothing of the run is left alive.
        assert any((rd / "checkpoints").glob("step_*"))
        from areal_hpc.registry import Registry

        assert Registry.for_run(rd).list("servers") == {}
    finally:
        if owner.poll() is None:  # the owner stops its children on SIGTERM; never leave servers behind
            owner.send_signal(signal.SIGTERM)
            try:
                owner.wait(90)
            except subprocess.TimeoutExpired:
                owner.send_signal(signal.SIGKILL)


# The README's custom-trainer example ("Add your own trainer, workflow or reward"), verbatim.
RFT_EXAMPLE = '''# my_rft.py
from areal_hpc.train.engine import loss_token_count
from areal_hpc.train.sft_loss import sft_loss
from areal_hpc.trainers import register_trainer
from areal_hpc.trainers.ppo_trainer import PPOTrainer


@register_trainer("rft")
class RejectionSamplingTrainer(PPOTrainer):
    """SFT on the rollouts that got reward 1; everything else is the PPO trainer's."""

    def train_on(self, actor, batch):
        good = batch["rewards"] >= 1.0
        batch["loss_mask"] = batch["loss_mask"] & good[:, None]
        stats = actor.engine.train_batch(batch, sft_loss, loss_token_count)
        actor.engine.step_lr_scheduler()
        stats["kept_frac"] = float(good.float().mean())
        return stats
'''
RFT_COMMAND = "areal-hpc submit configs/quickstart.yaml trainer.type=rft trainer.plugins=[my_rft.py] " \
              "trainer.total_train_steps=40"


def test_readme_shows_the_custom_trainer_example():
    readme = (REPO / "README.md").read_text()
    assert f"```python\n{RFT_EXAMPLE}```" in readme and RFT_COMMAND in readme


def test_readme_custom_trainer_example(tmp_path):
    (tmp_path / "my_rft.py").write_text(RFT_EXAMPLE)
    overrides = [*RFT_COMMAND.split()[3:], *SMALL]
    overrides = [o.replace("trainer.total_train_steps=40", "trainer.total_train_steps=6") for o in overrides]
    submit(tmp_path, *overrides)
    rows = metrics(run_dir(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, 7)) and "kept_frac" in rows[-1]


@pytest.mark.parametrize("weight_update", ["disk", "gloo"])
def test_servers_outlive_the_trainer_and_a_restart_reuses_them(tmp_path, weight_update):
    """shutdown_server_on_exit=False: the trainer ends, servers stay; `submit ... min_required_servers=1`
    starts only a trainer, which resumes from the checkpoint and continues the step count. With the
    collective path the new trainer forms a new weight group with the old server."""
    from areal_hpc.registry import Registry

    common = [*SMALL[:-1], "shutdown_server_on_exit=False", "saver.freq_steps=2",
              f"trainer.ppo.weight_update={weight_update}"]
    submit(tmp_path, *common, "trainer.total_train_steps=4")
    rd = run_dir(tmp_path)
    reg = Registry.for_run(rd)
    before = reg.list("servers")
    assert len(before) == 1
    pid = next(iter(before.values()))["pid"]
    try:
        submit(tmp_path, *common, "trainer.total_train_steps=8", "min_required_servers=1")
        deadline = time.time() + 10  # the record catches up within a heartbeat
        while time.time() < deadline and next(iter(reg.list("servers").values()))["weight_version"] != 8:
            time.sleep(0.2)
        after = reg.list("servers")
        assert [r["pid"] for r in after.values()] == [pid]  # the same server process served both trainers
        assert next(iter(after.values()))["weight_version"] == 8
        assert [r["step"] for r in metrics(rd)] == list(range(1, 9))  # no step skipped or repeated
        trainer_log = (rd / "logs" / "trainer-0.log").read_text()
        assert "recovered from checkpoint: step 4" in trainer_log
        if weight_update == "gloo":  # one group per trainer, the same server in both
            assert trainer_log.count("formed with 1 server(s)") == 2, trainer_log
    finally:
        stop = subprocess.run([sys.executable, "-m", "areal_hpc", "stop", f"cluster.fileroot={tmp_path}",
                               "experiment_name=quickstart", "trial_name=run0", "--timeout", "60"],
                              capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert reg.list("servers") == {}


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_a_killed_owner_takes_its_run_down(tmp_path):
    """`submit` SIGKILLed (no chance to stop its children): servers and trainer get SIGTERM from
    the kernel, deregister, and exit instead of running on as orphans."""

    owner = start_run(tmp_path, *SMALL)
    pids: list = []
    try:
        rd = wait_for_steps(tmp_path, 1)
        pids = [int(p) for m in re.findall(r"'pids': \[([\d, ]+)\]", (rd / "logs" / "driver.log").read_text())
                for p in m.split(",")]
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # one server, one trainer rank
        owner.kill()
        owner.wait(10)
        wait_until(lambda: not any(_alive(p) for p in pids), 120, f"the run's tasks {pids} to exit", interval=0.5)
        from areal_hpc.registry import Registry

        assert Registry.for_run(rd).list("servers") == {}  # deregistered on the way out
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_an_added_server_joins_the_weight_group(tmp_path):
    """Collective weight path (gloo on CPU): `add-servers` mid-run starts a server that loads the
    disk copy first, then the trainer forms a new group with both servers and every later update
    reaches both."""
    owner = start_run(tmp_path, "rollout.gen.max_new_tokens=8", "rollout.gen.ignore_eos=True", "rollout.batch_size=4",
                      "rollout.n_samples=4", "saver.freq_steps=2", "trainer.ppo.weight_update=gloo")
    names = [f"cluster.fileroot={tmp_path}", "experiment_name=quickstart", "trial_name=run0"]
    try:
        rd = wait_for_steps(tmp_path, 3)
        add = subprocess.run([sys.executable, "-m", "areal_hpc", "add-servers", "count=1", *names],
                             capture_output=True, text=True, timeout=300)
        assert add.returncode == 0 and "server-1" in add.stdout, add.stdout + add.stderr
        n = len(metrics(rd))
        wait_until(lambda: any(m.get("servers_updated") == 2 for m in metrics(rd)[n:]), 120,
                   "a weight update reaching both servers", interval=0.5)
        later = metrics(rd)[n:]
        assert any(m.get("servers_updated") == 2 for m in later), later
        first = next(i for i, m in enumerate(later) if m.get("servers_updated") == 2)
        assert all(m["servers_updated"] == 2 for m in later[first:]), later
        loaded = re.findall(r"loaded published weights v(\d+)", (rd / "logs" / "server-1.log").read_text())
        assert loaded and int(loaded[0]) >= 2, loaded  # seeded from the disk copy before it joined
        log = (rd / "logs" / "trainer-0.log").read_text()
        assert log.index("formed with 1 server(s)") < log.index("formed with 2 server(s)"), log
    finally:
        subprocess.run([sys.executable, "-m", "areal_hpc", "stop", *names, "--timeout", "60"], capture_output=True)
        try:
            owner.wait(90)
        except subprocess.TimeoutExpired:
            owner.kill()


def _refuse_after_a_failed_broadcast(reg, sid: str, model: str) -> None:
    """Put server ``sid`` in the state a failed weight broadcast leaves: the trainer side of its group goes away before
    broadcasting, so the server answers every /generate with 503 until a complete weight update."""
    import socket
    import textwrap
    import urllib.error
    import urllib.request

    from safetensors import safe_open

    def post(path: str, body: dict):
        url = f"http://{reg.get('servers', sid)['address']}{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {reg.secret()}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from areal_hpc.inference.hf_engine.model_runner import init_custom_process_group
        init_custom_process_group("gloo", "tcp://127.0.0.1:{port}", 2, 0, "dead", 60)
    """)], env=dict(os.environ, GLOO_SOCKET_IFNAME="lo"))  # joins the group, then exits
    status, body = post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                                                        "rank_offset": 1, "world_size": 2, "backend": "gloo",
                                                        "group_name": "dead", "timeout": 60})
    assert status == 200 and peer.wait(60) == 0, body
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:  # the toy model's tensors are float32
        names = list(f.keys())[:2]
        bucket = {"names": names, "dtypes": ["float32"] * 2, "shapes": [f.get_slice(n).get_shape() for n in names],
                  "group_name": "dead", "weight_version": "1"}
    status, body = post("/update_weights_from_distributed", bucket)
    assert status == 400 and "broadcast failed" in body["message"], body
    status, body = post("/generate", {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2}})
    assert status == 503 and "partly updated" in body["message"], body


@pytest.mark.parametrize("weight_update", ["disk", "gloo"])
def test_a_trainer_starting_at_version_0_makes_a_refusing_server_whole_again(tmp_path, weight_update):
    """A server whose last weight broadcast failed refuses every request until a complete weight update. A trainer
    that started at version 0 (no checkpoint) with min_required_servers=0 pushed no weights, so its rollouts failed
    on that server for good. Every trainer now pushes its weights before generating: the server serves again."""
    from helpers import serve_argv

    from areal_hpc.registry import Registry
    from areal_hpc.toy import resolve_model

    rd = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    argv = serve_argv(rd, "s0", QUICKSTART, f"cluster.fileroot={tmp_path}", *SMALL, "trainer.total_train_steps=1",
                      f"trainer.ppo.weight_update={weight_update}", "rollout.gen.max_new_tokens=2",
                      "rollout.drop_timeout_s=5")  # (the old code failed at its bound, not at the timeout)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        reg = Registry.for_run(rd)
        wait_until(lambda: (reg.get("servers", "s0") or {}).get("state") == "ready" or server.poll() is not None, 120,
                   "server s0")
        _refuse_after_a_failed_broadcast(reg, "s0", resolve_model("toy:qwen3-h128-l2"))
        trainer = subprocess.run([sys.executable, "-m", "areal_hpc", "train", "--run-dir", str(rd)], env=env,
                                 capture_output=True, text=True, timeout=300)
        assert trainer.returncode == 0, trainer.stderr[-3000:]
        assert [r["step"] for r in metrics(rd)] == [1]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
