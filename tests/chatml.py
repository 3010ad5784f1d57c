"""A tiny local model whose tokenizer carries the chat template Qwen2.5-Instruct ships (ChatML),
and a real `hf` server to run it: no hub, no download.

The tokenizer is character-level (printable ASCII and newline) plus ChatML's special tokens.
Its EOS is ``<|endoftext|>`` (as for the Qwen2.5 base models, which ship the same template), so
``<|im_end|>`` stops generation only when it is found as the template's end-of-turn token.

`build_chatml_model(..., steer=...)` can make the model a deterministic bigram model: every
layer's output projections are zeroed (the residual stream is the current token's embedding),
embeddings are one-hot and the LM head maps token ``a`` to a large logit for ``steer[a]``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-Instruct's tokenizer_config.json "chat_template", verbatim.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

# "\n" ends the generation prompt ("<|im_start|>assistant\n"): the steered model then writes
# "\boxed{7}", closes its turn with <|im_end|> and, if nothing stops it, goes on with "8888...".
BOXED_SEVEN = {"\n": "\\", "\\": "b", "b": "o", "o": "x", "x": "e", "e": "d", "d": "{", "{": "7", "7": "}",
               "}": "<|im_end|>", "<|im_end|>": "8", "8": "8"}


def build_chatml_tokenizer(out_dir, template: Optional[str] = QWEN25_CHAT_TEMPLATE, specials=tuple(SPECIALS),
                           eos: str = "<|endoftext|>"):
    """Character-level; ``specials[0]`` is the unknown token, the others are special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], eos_token=eos, pad_token=eos,
                                   additional_special_tokens=[t for t in specials[1:] if t != eos])
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir))
    return fast


def build_chatml_model(out_dir, steer: Optional[Dict[str, str]] = None, template: Optional[str] = QWEN25_CHAT_TEMPLATE,
                       seed: int = 0) -> Path:
    """A 1-layer Qwen3 (hidden 128, untied LM head) saved with the ChatML tokenizer. (Not qwen2: for a
    qwen2 config transformers 5.x loads the tokenizer as its byte-level Qwen2Tokenizer, whatever was saved.)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_chatml_tokenizer(out_dir, template)
    hidden = 128
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=hidden, intermediate_size=256,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                               head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if steer:
        assert len(tok) <= hidden
        ids = tok.convert_tokens_to_ids
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight.zero_()
            model.model.embed_tokens.weight[:, :len(tok)] = torch.eye(len(tok))
            model.lm_head.weight.zero_()
            for a, b in steer.items():
                model.lm_head.weight[ids(b), ids(a)] = 5.0  # x sqrt(hidden) after RMSNorm: a logit of ~57
    model.save_pretrained(str(out_dir))
    return out_dir


class HFServer:
    """One real `hf` server process (``areal-hpc serve``) on ``model``."""

    def __init__(self, run_dir: Path, model: str, sid: str = "s0"):
        from areal_hpc.registry import Registry
        from helpers import serve_argv

        self.run_dir, self.sid = Path(run_dir), sid
        self.registry = Registry(self.run_dir / "registry", ttl_s=5.0)
        env = dict(os.environ, OMP_NUM_THREADS="1", AREAL_HPC_LOG_LEVEL="WARNING",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = self.run_dir / f"{sid}.log"
        self.proc = subprocess.Popen(
            serve_argv(self.run_dir, sid, f"server.model_path={model}", "launcher.heartbeat_s=0.5", "launcher.ttl_s=5"),
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))

    def wait_ready(self, timeout: float = 120.0) -> "HFServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registry.list("servers").get(self.sid, {}).get("state") == "ready":
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s")

    def pool(self):
        from areal_hpc.inference.client import ServerPool

        return ServerPool(self.registry, self.registry.secret(), refresh_s=0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
