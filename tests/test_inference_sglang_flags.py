"""Every flag our SGLang command builder can emit exists in the pinned SGLang version.

The pinned wheel is downloaded once (``pip download --no-deps``) into
``~/.cache/areal-hpc/wheels`` (``AREAL_HPC_CACHE`` moves it) and read as a zip: SGLang is
never imported (it needs CUDA and ~46 GPU packages).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from areal_hpc.config.schema import ServerConfig
from areal_hpc.inference.sglang import (SGLANG_VERSION, base_gpu_and_env, build_sglang_options, render_argv,
                                        write_key_config)

ROOT = Path(__file__).resolve().parents[1]
# the flag reader is part of the developer tool tools/sglang_contract.py (not the package)
_spec = importlib.util.spec_from_file_location("sglang_contract", ROOT / "tools" / "sglang_contract.py")
_tool = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_tool)
declared_flags = _tool.declared_flags


@pytest.fixture(scope="module")
def wheel() -> Path:
    cache = Path(os.environ.get("AREAL_HPC_CACHE", Path.home() / ".cache" / "areal-hpc")) / "wheels"
    found = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.11", "--platform", "manylinux_2_34_x86_64", "-d", str(cache), f"sglang=={SGLANG_VERSION}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        found = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if not found:
            pytest.skip(f"could not download sglang=={SGLANG_VERSION}: {r.stderr[-500:]}")
    return found[-1]


@pytest.fixture(scope="module")
def flags(wheel):
    f = declared_flags(wheel)
    assert len(f) > 200 and "--model-path" in f and "--config" in f, "flag extraction found too little"
    return f


def emitted(opts):
    """(flag, bare?) pairs of a rendered command line."""
    argv = render_argv(opts, python="python")
    assert argv[:3] == ["python", "-m", "sglang.launch_server"]
    out = []
    for i, a in enumerate(argv[3:], start=3):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out.append((a, nxt is None or nxt.startswith("--")))
    return out


def variants(tmp_path):
    cfg = ServerConfig(dtype="auto", context_length=8192, max_running_requests=128, random_seed=7)
    key_file = write_key_config(tmp_path / "k.yaml", "secret-key")
    yield build_sglang_options(cfg, "/m", host="0.0.0.0", port=30000, api_key="k", tp_size=2, pp_size=2, base_gpu_id=4)
    yield build_sglang_options(cfg, "/m", host="0.0.0.0", port=30000, config_file=key_file)
    bare = ServerConfig(dtype="float16", context_length=0, max_running_requests=0)
    yield build_sglang_options(bare, "/m", host="h", port=1, weight_version=None)
    yield build_sglang_options(cfg, "/m", host="0.0.0.0", port=30000, api_key="k", tp_size=16, nnodes=2,
                               node_rank=1, dist_init_addr="node0:5000")
    passthrough = ServerConfig(sglang_args={
        "attention-backend": "fa3", "enable_memory_saver": "true", "--disable-radix-cache": True,
        "chunked-prefill-size": 4096, "log-level": "warning", "skip-tokenizer-init": "false",
        "tp-size": 4, "json-model-override-args": {"rope_scaling": None}})
    yield build_sglang_options(passthrough, "/m", host="0.0.0.0", port=30000, api_key="k")


def test_every_emitted_flag_exists_in_pinned_sglang(flags, tmp_path):
    seen = set()
    for opts in variants(tmp_path):
        for flag, bare in emitted(opts):
            assert flag in flags, f"{flag} is not a flag of sglang {SGLANG_VERSION}"
            kind = flags[flag]
            if kind is not None:
                assert kind == bare, f"{flag}: SGLang {'takes no' if kind else 'needs a'} value"
            seen.add(flag)
    for must in ("--model-path", "--host", "--port", "--tp-size", "--pp-size", "--base-gpu-id", "--random-seed",
                 "--mem-fraction-static", "--context-length", "--skip-tokenizer-init", "--api-key", "--config",
                 "--dtype", "--nnodes", "--node-rank", "--dist-init-addr", "--weight-version",
                 "--max-running-requests", "--attention-backend", "--enable-memory-saver",
                 "--disable-radix-cache"):
        assert must in seen, f"no builder variant exercised {must}"


def test_builder_semantics(tmp_path):
    cfg = ServerConfig(sglang_args={"tp-size": 4, "skip-tokenizer-init": "false", "enable-memory-saver": ""})
    opts = build_sglang_options(cfg, "/m", host="0.0.0.0", port=1234, api_key="k", tp_size=2)
    assert opts["--tp-size"] == "4"  # pass-through wins
    assert "--skip-tokenizer-init" not in opts  # "false" removes a flag
    assert opts["--enable-memory-saver"] is None  # bare
    assert opts["--dtype"] == "bfloat16"  # our auto = bf16 on GPU
    with pytest.raises(ValueError, match="dist_init_addr"):
        build_sglang_options(ServerConfig(), "/m", host="h", port=1, nnodes=2)
    key_file = tmp_path / "sub" / "key.yaml"
    write_key_config(key_file, "s3cr3t")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert key_file.read_text() == 'api-key: "s3cr3t"\n'
    opts = build_sglang_options(ServerConfig(), "/m", host="h", port=1, api_key="s3cr3t", config_file=str(key_file))
    assert "--api-key" not in opts and "s3cr3t" not in " ".join(render_argv(opts))
    assert base_gpu_and_env([2, 3], env={}) == (2, {})
    assert base_gpu_and_env([1, 5], env={}) == (0, {"CUDA_VISIBLE_DEVICES": "1,5"})
    assert base_gpu_and_env([4, 5], env={"CUDA_VISIBLE_DEVICES": "4,5"}) == (0, {})


def test_sglang_tp_default_leaves_room_for_pp(tmp_path):
    """Without a tp_size a server's GPUs are split over its pipeline stages: tp * pp of them in all."""
    from areal_hpc.config.schema import LauncherConfig
    from areal_hpc.inference.server import ServerLifecycle

    life = ServerLifecycle(tmp_path, ServerConfig(), "/m", LauncherConfig(), "g0", "sglang", [0, 1, 2, 3], pp_size=2)
    assert (life.tp_size, life.pp_size) == (2, 2)


def test_version_pinned_once():
    setup_cfg = ROOT / "setup.cfg"
    if not setup_cfg.exists():
        pytest.skip("no setup.cfg yet")
    text = setup_cfg.read_text()
    if "sglang" in text:
        assert f"sglang=={SGLANG_VERSION}" in text.replace(" ", ""), "setup.cfg pins another sglang version"


@pytest.mark.parametrize("key", ["port", "--host", "api_key", "config", "model-path"])
def test_flags_the_lifecycle_sets_itself_are_refused_in_sglang_args(key):
    """The server talks to SGLang at its host, port and key, and records its model: one of those passed through would
    leave it waiting on an address SGLang does not serve, or a record that lies."""
    with pytest.raises(ValueError, match=f"server.sglang_args.{key}"):
        build_sglang_options(ServerConfig(sglang_args={key: "x"}), "/m", host="h", port=1)
