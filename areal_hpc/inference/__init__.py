"""Inference: server lifecycle, the SGLang command builder, the embedded `hf` engine, the client pool.

* `server.serve` (``areal-hpc serve``): run one server (hf or sglang), registered in the run's
  registry while it lives.
* `client.ServerPool`: discover servers, route by least load, retry, resume aborted generations.
* `sglang.build_sglang_argv`: ``python -m sglang.launch_server ...`` from a ServerConfig.
* `sglang_api`: every route, request body and response parser we use with a server;
  `sglang_contract` checks them against SGLang's own source (``tools/sglang_contract.py``).
* `hf_engine`: continuous batching on a transformers model behind SGLang's HTTP API
  (`http_server`). Importing this package does not import torch.

Knows nothing of Slurm (it only records SLURM_* ids it finds in its environment).
"""

_EXPORTS = {
    "ServerPool": "client", "GenerateResult": "client", "CallResult": "client", "PoolError": "client",
    "RequestRejected": "client", "serve": "server",
    "build_sglang_argv": "sglang", "SGLANG_VERSION": "sglang",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy: importing this package imports none of its modules
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"areal_hpc.inference.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'areal_hpc.inference' has no attribute {name!r}")
