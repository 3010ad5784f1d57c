"""Inference: server lifecycle, the SGLang command builder, the embedded `hf` engine, the client pool.

``server`` (``areal-hpc serve``: one hf or sglang server, registered in the run's registry while it lives), ``client``
(`ServerPool`: discover servers, route by least load, retry, resume aborted generations), ``sglang``
(``python -m sglang.launch_server ...`` from a ServerConfig), ``sglang_api`` (every route, request body and response
parser we use with a server; checked against SGLang's own source by ``tools/sglang_contract.py``), ``hf_engine``
(continuous batching on a transformers model) behind ``http_server`` (SGLang's HTTP API; ``http_validate`` checks
requests). Importing this package imports none of its modules (no torch).

Knows nothing of Slurm (it only records SLURM_* ids it finds in its environment).
"""
