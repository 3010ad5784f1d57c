"""Inference: the ``serve`` lifecycle (``server``), the SGLang backend (``sglang``, ``sglang_api``), the embedded `hf`
engine (``hf_engine``) behind SGLang's HTTP API (``http_server``, ``http_validate``), and the client pool (``client``).

Importing this package imports none of its modules (no torch). It knows nothing of Slurm beyond the SLURM_* ids it
records from its environment.
"""
