"""Temp names of files and directories being written (`registry.util.temp_name`): unique across the hosts of a shared
filesystem, and bounded where the run dir's path length is validated."""

import contextlib
import os
import socket

import pytest



def _as_host(monkeypatch, host: str, pid: int = 4194304) -> None:  # 4194304: the largest pid Linux allows
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    monkeypatch.setattr(os, "getpid", lambda: pid)


def test_run_dir_bound_covers_a_registry_temp_path_with_the_longest_hostname(tmp_path, monkeypatch):
    """Validation keeps the run dir's path short enough for every path the package writes inside it
    (`_LONGEST_INSIDE` bytes). Registry temp names carry the hostname, and a hand-started server's record name
    carries it too: with 64-byte hostnames (HOST_NAME_MAX) the temp path was longer than the 64 bytes allowed for."""
    from areal_hpc.config.validate import _LONGEST_INSIDE
    from areal_hpc.launch.entry import manual_server_id
    from areal_hpc.registry import Registry

    _as_host(monkeypatch, "n" * 64)
    written, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (written.append(src), replace(src, dst))[1])
    run = tmp_path / "run"
    Registry.for_run(run).put("servers", manual_server_id(), {"url": "http://x"})
    assert written
    for path in written:
        assert len(os.path.relpath(path, run).encode()) <= _LONGEST_INSIDE, path


def test_toy_model_temp_dir_differs_between_hosts_with_the_same_pid(tmp_path, monkeypatch):
    """Two hosts building the same toy model in a shared cache with the same pid wrote into one temp dir
    (``<name>.tmp<pid>``): one build's files mixed into the other's."""
    from areal_hpc import toy

    built = []
    monkeypatch.setattr(toy, "build_model", lambda out, **kw: (built.append(out), out.mkdir(parents=True)))
    for host in ("node-a", "node-b"):
        _as_host(monkeypatch, host, 1234)
        toy.resolve_model("toy:qwen3-h64-l2", cache_dir=tmp_path / host)
    assert built[0].name != built[1].name


def test_weights_temp_dir_differs_between_hosts_with_the_same_pid(tmp_path, monkeypatch):
    """A trainer on another host with the same pid (a requeued run whose old trainer still writes) wrote ``v{K}``
    through the same temp dir (``.v{K}.tmp<pid>``), and removed it first: the two writes mixed."""
    from types import SimpleNamespace

    import torch
    from transformers import PretrainedConfig

    from areal_hpc.train import publish

    used = []
    monkeypatch.setattr(publish, "write_hf_checkpoint", lambda sd, tmp, static: (used.append(tmp), tmp.mkdir()))
    engine = SimpleNamespace(precision=SimpleNamespace(param_dtype=torch.float32), hf_config=PretrainedConfig(),
                             state_dict_for_hf=lambda dtype: {"w": torch.zeros(2)})
    for host in ("node-a", "node-b"):
        _as_host(monkeypatch, host, 1234)
        publish.stage_weights(engine, tmp_path / "weights", 5, "")()
    assert used[0] != used[1]


def test_prune_removes_a_torn_write_of_another_host_with_the_same_pid(tmp_path, monkeypatch):
    """A crashed trainer's unfinished ``v{K}`` write is pruned, even one of a host whose pid was the same as ours; this
    process's own write in progress is kept."""
    from areal_hpc.registry.util import temp_name
    from areal_hpc.train.publish import prune_weights

    root = tmp_path / "weights"
    (root / "v4").mkdir(parents=True)
    _as_host(monkeypatch, "node-a", 1234)
    torn = root / temp_name("v5")
    _as_host(monkeypatch, "node-b", 1234)
    mine, old_style = root / temp_name("v6"), root / ".v7.tmp1234"  # a write of a trainer before temp_name
    for d in (torn, mine, old_style):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    assert prune_weights(root, None, keep_min_version=4) == []
    assert not torn.exists() and not old_style.exists() and mine.exists() and (root / "v4").exists()


def test_own_temp_needs_the_whole_host_name():
    """A host whose name ends with this host's name (``a.node1`` vs ``node1``) does not make this process's temps."""
    from areal_hpc.registry.util import own_temp, temp_name

    host, pid = socket.gethostname(), os.getpid()
    assert own_temp(temp_name("v3"), r"v\d+")
    assert not own_temp(f".v3.a.{host}.{pid}.0.tmp", r"v\d+") and not own_temp(f".v3.{host}.{pid}1.0.tmp", r"v\d+")
    assert not own_temp(temp_name("x3"), r"v\d+")


def _local_ipv4s():
    """This host's IPv4 addresses other than loopback (SIOCGIFADDR on each interface)."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                ip = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))[20:24])
                if not ip.startswith("127."):
                    found.append(ip)
    return found


def test_the_weight_group_address_is_the_one_on_the_route_to_the_servers(monkeypatch):
    """The trainer hosts the weight group's rendezvous at gethostbyname(gethostname()), which Debian's /etc/hosts
    maps to 127.0.1.1: servers on other nodes could not reach it. The address is now the one this host uses to
    reach a server."""
    from areal_hpc.trainers import rollout_side

    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts for the hostname
    assert rollout_side.address_towards("http://127.0.0.1:30000") == "127.0.0.1"
    ips = _local_ipv4s()
    if not ips:
        pytest.skip("no network interface but loopback")
    for ip in ips:
        assert rollout_side.address_towards(f"http://{ip}:30000") == ip
