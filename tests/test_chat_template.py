"""Chat templates: prompts go to the model rendered with the tokenizer's template (here the ChatML
template Qwen2.5-Instruct ships, on a tiny local model), and a real `hf` server receives exactly
those ids; the template's end-of-turn token stops generation; system prompts, messages rows,
raw text (chat_template=none, and tokenizers without a template); SFT rows rendered the same way.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from chatml import BOXED_SEVEN, HFServer, build_chatml_model, build_chatml_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from areal_hpc.config.schema import GenerationConfig
from areal_hpc.rollout.prompts import PromptEncoder, PromptFormat, end_of_turn_id, stop_token_ids
from areal_hpc.rollout.workflow import RLVRWorkflow
from areal_hpc.toy import resolve_model
from areal_hpc.train.sft_loss import tokenize_rows

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# Llama-3's turn structure (its template without the date/tools preamble).
LLAMA3_TEMPLATE = ("{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                   "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{%- endif %}")
LLAMA3_SPECIALS = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")


def chatml(*turns, generation_prompt: bool = True) -> str:
    """ChatML written by hand: what the template must render."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def ids_of(tok, text: str):
    return tok(text, add_special_tokens=False)["input_ids"]


def user(content: str):
    return {"role": "user", "content": content}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random weights: every output logprob depends on every prompt token."""
    return str(build_chatml_model(tmp_path_factory.mktemp("chatml") / "random"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_prompt_is_the_rendered_template(tok):
    ids = PromptEncoder(tok).encode({"prompt": "3+4="})
    assert ids == ids_of(tok, QWEN_SYSTEM + chatml(("user", "3+4=")))  # Qwen's default system message
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2  # one token each
    assert tok.decode(ids[-10:]) == "assistant\n"  # ends where the reply begins


def test_system_prompt_and_messages_rows(tok):
    enc = PromptEncoder(tok, PromptFormat(system_prompt="Be brief."))
    assert enc.encode({"prompt": "3+4="}) == ids_of(tok, chatml(("system", "Be brief."), ("user", "3+4=")))
    convo = [{"role": "system", "content": "Mine."}, user("1+1="), {"role": "assistant", "content": "2"}, user("2+2=")]
    # a row's own system message is kept, not doubled
    assert enc.encode({"messages": convo}) == ids_of(tok, chatml(("system", "Mine."), ("user", "1+1="),
                                                                 ("assistant", "2"), ("user", "2+2=")))
    assert enc.prompt_text({"messages": convo}) == "2+2="  # what a reward function gets as `prompt`
    # messages win over a prompt string; the key is configurable
    plain = PromptEncoder(tok, PromptFormat(messages_key="conversation"))
    assert plain.encode({"prompt": "ignored", "conversation": [user("5+5=")]}) == ids_of(tok, QWEN_SYSTEM + chatml(
        ("user", "5+5=")))
    with pytest.raises(ValueError, match="'conversation'.*list of"):
        plain.encode({"conversation": "5+5="})
    with pytest.raises(ValueError, match="neither 'prompt' nor 'conversation'"):
        plain.encode({"question": "5+5="})


def test_chat_template_none_is_raw_text(tok):
    enc = PromptEncoder(tok, PromptFormat(chat_template="none"))
    assert not enc.uses_template
    assert enc.encode({"prompt": "3+4="}) == ids_of(tok, "3+4=")
    with pytest.raises(ValueError, match="has 'messages' but no 'prompt': chat_template=none"):
        enc.encode({"messages": [user("3+4=")]})
    assert stop_token_ids(tok, chat_template="none") == [tok.eos_token_id]
    with pytest.raises(ValueError, match="chat_template must be one of auto, none"):
        PromptEncoder(tok, PromptFormat(chat_template="yes"))


def test_a_prompt_of_none_is_no_prompt(tok):
    """A dataset mixing prompt rows and messages rows gives each row both columns, the missing one None (`datasets`
    unifies the columns): a messages row was then sent, without a template, as the text "None"."""
    row = {"messages": [user("3+4=")], "prompt": None}
    with pytest.raises(ValueError, match="has 'messages' but no 'prompt': chat_template=none"):
        PromptEncoder(tok, PromptFormat(chat_template="none")).encode(row)
    assert PromptEncoder(tok).prompt_text(row) == "3+4="
    assert PromptEncoder(tok).encode({"messages": None, "prompt": "3+4="}) == PromptEncoder(tok).encode(row)


def test_a_prompt_column_of_messages(tok):
    """TRL's conversational datasets hold the chat messages in the `prompt` column. With messages_key=prompt the list
    was taken for a prompt string: `submit` refused it ("'prompt' must be a string, got list"), and the reward's
    `prompt` (and a raw-text prompt) was the list's repr."""
    enc = PromptEncoder(tok, PromptFormat(messages_key="prompt", system_prompt="Be brief."))
    row = {"prompt": [user("3+4=")], "answer": "7"}
    assert enc.encode(row) == ids_of(tok, chatml(("system", "Be brief."), ("user", "3+4=")))
    assert enc.prompt_text(row) == "3+4="
    with pytest.raises(ValueError, match="has 'prompt' but no 'prompt': chat_template=none"):
        PromptEncoder(tok, PromptFormat(messages_key="prompt", chat_template="none")).encode(row)


def test_a_finished_conversation_is_not_the_prompt(tok):
    """Math datasets such as open-r1/OpenR1-Math-220k hold the problem and a `messages` column with the reference
    solution as the assistant's turn. With prompt_key=problem the messages still won: the model was prompted with the
    solution and asked to reply after it. Messages that end with the reply are no prompt: the prompt string is."""
    solved = [user("3+4="), {"role": "assistant", "content": "3+4 is 7, \\boxed{7}"}]
    enc = PromptEncoder(tok, PromptFormat(prompt_key="problem"))
    assert enc.encode({"problem": "3+4=", "messages": solved}) == ids_of(tok, QWEN_SYSTEM + chatml(("user", "3+4=")))
    with pytest.raises(ValueError, match=r"'messages'\] ends with the assistant's reply"):
        enc.encode({"messages": solved})


def test_a_tokenizer_without_template_keeps_raw_text(tmp_path):
    toy = AutoTokenizer.from_pretrained(resolve_model("toy:qwen3-h64-l1", cache_dir=tmp_path))
    enc = PromptEncoder(toy)
    assert not enc.uses_template and enc.encode({"prompt": "3+4="}) == ids_of(toy, "3+4=")
    assert stop_token_ids(toy) == [toy.eos_token_id] and enc.end_of_turn_ids() == [toy.eos_token_id]
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        enc.encode({"messages": [user("3+4=")]})


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_a_system_prompt_without_a_template_is_refused(tmp_path, tok, mode):
    """Raw-text prompts have no place for a system prompt: it was dropped without a word when the tokenizer had no
    template (chat_template=auto); refused as chat_template=none with it is (config/validate.py)."""
    toy = AutoTokenizer.from_pretrained(resolve_model("toy:qwen3-h64-l1", cache_dir=tmp_path))
    why = "the tokenizer has no chat template" if mode == "auto" else "chat_template=none"
    with pytest.raises(ValueError, match=f"system_prompt goes into the chat template, but {why}"):
        PromptEncoder(toy if mode == "auto" else tok, PromptFormat(chat_template=mode, system_prompt="Be brief."))


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_template_kwargs_without_a_template_are_refused(tmp_path, tok, mode):
    """They went nowhere without a word (raw-text prompts), like a system prompt: refused at submit and here."""
    toy = AutoTokenizer.from_pretrained(resolve_model("toy:qwen3-h64-l1", cache_dir=tmp_path))
    why = "the tokenizer has no chat template" if mode == "auto" else "chat_template=none"
    with pytest.raises(ValueError, match=f"chat_template_kwargs go to the chat template, but {why}"):
        PromptEncoder(toy if mode == "auto" else tok,
                      PromptFormat(chat_template=mode, chat_template_kwargs={"enable_thinking": False}))


def test_end_of_turn_token_of_other_templates(tmp_path, tok):
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
    llama = build_chatml_tokenizer(tmp_path / "llama3", LLAMA3_TEMPLATE, specials=LLAMA3_SPECIALS,
                                   eos="<|end_of_text|>")
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_id(llama) == eot
    assert stop_token_ids(llama) == sorted([llama.eos_token_id, eot])
    assert PromptEncoder(llama).encode({"prompt": " 3+4= "}) == ids_of(
        llama, "<|start_header_id|>user<|end_header_id|>\n\n3+4=<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # a template whose turns end in plain text has no end-of-turn token: the EOS alone stops
    plain = build_chatml_tokenizer(tmp_path / "plain", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                                   "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn_id(plain) is None and stop_token_ids(plain) == [plain.eos_token_id]
    strict = build_chatml_tokenizer(tmp_path / "strict", "{% if messages[0]['role'] == 'system' %}"
                                    "{{ raise_exception('System role not supported') }}{% endif %}x")
    with pytest.raises(ValueError, match=r"rejected \['system', 'user'\]: System role not supported"):
        PromptEncoder(strict, PromptFormat(system_prompt="Be brief.")).encode({"prompt": "3+4="})
    # generation_config.json's eos_token_id list (Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>) joins in
    (tmp_path / "plain" / "generation_config.json").write_text('{"eos_token_id": [3, 1, 42]}')
    assert stop_token_ids(AutoTokenizer.from_pretrained(tmp_path / "plain")) == [1, 3, 42]


def test_template_prompts_are_plain_id_lists(tok):
    """apply_chat_template(tokenize=True) returns a list in transformers 4.x, a BatchEncoding in 5.x:
    the encoder renders text and tokenizes it itself, so it returns one list of ints either way."""
    ids = PromptEncoder(tok).encode({"messages": [user("3+4=")]})
    assert type(ids) is list and all(type(t) is int for t in ids)


def test_workflow_stop_tokens(tok):
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert RLVRWorkflow(tok, GenerationConfig(stop_token_ids=[7])).params["stop_token_ids"] == sorted([7, eos, im_end])
    assert RLVRWorkflow(tok, GenerationConfig(), chat_template="none").params["stop_token_ids"] == [eos]
    assert RLVRWorkflow(tok, GenerationConfig(ignore_eos=True)).params["stop_token_ids"] == []


def test_sft_rows_use_the_template(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [{"prompt": "3+4=", "answer": "7"}, {"messages": [user("10+20=")], "answer": "30"}]
    b = tokenize_rows(rows, tok, prompts=PromptEncoder(tok))
    first = ids_of(tok, QWEN_SYSTEM + chatml(("user", "3+4=")) + "7<|im_end|>")
    second = ids_of(tok, QWEN_SYSTEM + chatml(("user", "10+20=")) + "30<|im_end|>")
    assert b["input_ids"][0, :len(first)].tolist() == first and b["input_ids"][1].tolist() == second
    assert b["loss_mask"][0].tolist() == [0] * (len(first) - 2) + [1, 1] + [0] * (len(second) - len(first))
    assert b["loss_mask"][1].tolist() == [0] * (len(second) - 3) + [1, 1, 1]  # "30" and <|im_end|>
    # what is trained is the template's own rendering of the finished conversation
    full = tok.apply_chat_template([user("3+4="), {"role": "assistant", "content": "7"}], tokenize=False)
    assert full.startswith(tok.decode(first)) and first[-1] == im_end
    raw = tokenize_rows(rows[:1], tok, prompts=PromptEncoder(tok, PromptFormat(chat_template="none")))
    assert raw["input_ids"][0].tolist() == ids_of(tok, "3+4=7") + [tok.eos_token_id]


async def _episode(workflow, pool, row):
    await pool.start()
    try:
        return await workflow.arun_episode(pool, row)
    finally:
        await pool.close()


async def _generate(pool, ids, params):
    await pool.start()
    try:
        return await pool.generate(ids, params)
    finally:
        await pool.close()


def _logprobs(model, prompt, output):
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(output)])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(output)[:, None])[:, 0]


def test_the_server_receives_the_rendered_ids(model_dir, tok, tmp_path):
    """The workflow's prompt reaches a real server as the hand-written ChatML's ids: the server's
    logprobs for what it generated are those of the model run on exactly these ids."""
    server = HFServer(tmp_path, model_dir).wait_ready()
    try:
        wf = RLVRWorkflow(tok, GenerationConfig(max_new_tokens=6, temperature=1.0), n_samples=2,
                          system_prompt="Be brief.")
        group = asyncio.run(_episode(wf, server.pool(), {"prompt": "3+4=", "answer": "7"}))
    finally:
        server.stop()
    expected = ids_of(tok, chatml(("system", "Be brief."), ("user", "3+4=")))
    other = ids_of(tok, chatml(("system", "Be brief."), ("user", "3+5=")))  # one token differs
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for t in group.trajectories:
        assert t.prompt_ids == expected and t.output_ids
        served = torch.tensor(t.logprobs)
        assert torch.allclose(served, _logprobs(model, expected, t.output_ids), atol=1e-4)
        assert not torch.allclose(served, _logprobs(model, other, t.output_ids), atol=1e-4)


def test_the_end_of_turn_token_stops_generation(tmp_path):
    """A model steered to write "\\boxed{7}<|im_end|>8888...": <|im_end|> is not its EOS, so only the
    template's end-of-turn token in the stop list ends the reply there."""
    model = build_chatml_model(tmp_path / "steered", steer=BOXED_SEVEN)
    tok = AutoTokenizer.from_pretrained(model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    server = HFServer(tmp_path, str(model)).wait_ready()
    try:
        wf = RLVRWorkflow(tok, GenerationConfig(max_new_tokens=16, temperature=1.0), reward_fn="math", n_samples=2)
        group = asyncio.run(_episode(wf, server.pool(), {"prompt": "What is 3+4?", "answer": "7"}))
        prompt = wf.prompts.encode({"prompt": "What is 3+4?"})
        eos_only = asyncio.run(_generate(server.pool(), prompt, {"max_new_tokens": 16, "temperature": 1.0,
                                                                 "stop_token_ids": [tok.eos_token_id]}))
    finally:
        server.stop()
    for t in group.trajectories:
        assert t.finish_reason == "stop" and t.output_ids[-1] == im_end
        assert tok.decode(t.output_ids) == "\\boxed{7}<|im_end|>"
        assert t.info["completion"] == "\\boxed{7}" and t.reward == 1.0  # decoded without specials, then scored
    # with the EOS alone (what the workflow used to send) the model talks on past its turn
    assert eos_only.finish_reason == "length" and tok.decode(eos_only.output_ids) == "\\boxed{7}<|im_end|>" + "8" * 6


def test_the_reward_sees_the_reply_without_its_stop_token(tmp_path):
    """SGLang trims the matched stop token from a reply's text (`trim_matched_stop`), special or not; decoding without
    special tokens only dropped a special one. A stop token of the user's (here ";", rollout.gen.stop_token_ids) stayed
    in the text the reward scored: "7;" is not the answer "7". The trained ids keep it, with its logprob."""
    model = build_chatml_model(tmp_path / "semicolon", steer={"\n": "7", "7": ";", ";": "<|im_end|>"})
    tok = AutoTokenizer.from_pretrained(model)
    semicolon = tok.convert_tokens_to_ids(";")
    server = HFServer(tmp_path, str(model)).wait_ready()
    try:
        wf = RLVRWorkflow(tok, GenerationConfig(max_new_tokens=8, stop_token_ids=[semicolon]), n_samples=2)
        group = asyncio.run(_episode(wf, server.pool(), {"prompt": "3+4=", "answer": "7"}))
    finally:
        server.stop()
    for t in group.trajectories:
        assert t.finish_reason == "stop" and tok.decode(t.output_ids) == "7;" and len(t.logprobs) == 2
        assert t.info["completion"] == "7" and t.reward == 1.0


# fix8-C
def test_raw_text_prompts_get_the_tokenizers_bos(tmp_path):
    """A Llama-style base tokenizer adds a BOS to text: raw prompts (rollout and SFT) start with it, as SGLang's
    text path does; a rendered template holds its own special tokens and gets none added."""
    from tokenizers.processors import TemplateProcessing

    base = build_chatml_tokenizer(tmp_path / "bos", template=None, specials=("<unk>", "<s>", "</s>"), eos="</s>")
    bos = base.convert_tokens_to_ids("<s>")
    base._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    row = {"prompt": "3+4=", "answer": "7"}
    assert PromptEncoder(base).encode(row) == [bos] + ids_of(base, "3+4=")
    sft = tokenize_rows([row], base, prompts=PromptEncoder(base))
    assert sft["input_ids"][0].tolist() == [bos] + ids_of(base, "3+4=7") + [base.eos_token_id]
    base.chat_template = "<s>{% for m in messages %}{{ m.content }}{% endfor %}"
    assert PromptEncoder(base).encode(row) == [bos] + ids_of(base, "3+4=")


def test_a_workflow_written_as_the_readme_shows_stops_at_the_end_of_turn(tmp_path):
    """A README-style workflow had the run's ``gen_config`` (rollout.gen) but not the stop tokens RLVRWorkflow adds
    (the template's end of turn, the model's EOS list): with a chat template whose end of turn is not the EOS, its
    replies ran on to max_new_tokens. ``self.params`` are the request's sampling params, those stops included."""
    from areal_hpc.rollout.workflow import WORKFLOWS, Group, RolloutWorkflow, Trajectory, make_workflow

    @WORKFLOWS.register("test-readme-chat")
    class OneReply(RolloutWorkflow):
        async def arun_episode(self, client, row):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            res = await client.generate(ids, self.params)
            return Group([Trajectory(ids, res.output_ids, res.logprobs, res.versions, 0.0, res.finish_reason)])

    model = build_chatml_model(tmp_path / "steered", steer=BOXED_SEVEN)
    tok = AutoTokenizer.from_pretrained(model)
    server = HFServer(tmp_path, str(model)).wait_ready()
    try:
        wf = make_workflow("test-readme-chat", tokenizer=tok, gen_config=GenerationConfig(max_new_tokens=16),
                           chat_template="auto")
        group = asyncio.run(_episode(wf, server.pool(), {"prompt": "What is 3+4?"}))
    finally:
        server.stop()
        WORKFLOWS.pop("test-readme-chat")
    (t,) = group.trajectories
    assert t.finish_reason == "stop" and tok.decode(t.output_ids) == "\\boxed{7}<|im_end|>"


# Qwen3's switch: with enable_thinking=false the generation prompt holds an empty think block
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                     "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_template_kwargs_reach_the_template_wherever_prompts_are_rendered(tmp_path):
    """A Qwen3 researcher could turn thinking off only by a `/no_think` prompt: `{ds}.chat_template_kwargs` (here from
    the command line) reach the template for rollout and eval prompts (the run's workflow for either dataset) and SFT
    rows."""
    from areal_hpc.config import load_config
    from areal_hpc.trainers.rollout_side import make_rollout_workflow

    qwen3 = build_chatml_tokenizer(tmp_path / "qwen3", THINKING_TEMPLATE)
    cfg = load_config(None, ["train_dataset.chat_template_kwargs.enable_thinking=false",
                             "valid_dataset.chat_template_kwargs={enable_thinking: false}"])
    row = {"prompt": "3+4=", "answer": "7"}
    thinking, off = chatml(("user", "3+4=")), chatml(("user", "3+4=")) + "<think>\n\n</think>\n\n"
    assert PromptEncoder(qwen3).encode(row) == ids_of(qwen3, thinking)  # the template's default
    for ds in (cfg.train_dataset, cfg.valid_dataset):
        assert make_rollout_workflow(cfg, qwen3, ds).prompts.encode(row) == ids_of(qwen3, off)
        sft = tokenize_rows([row], qwen3, prompts=PromptEncoder(qwen3, PromptFormat.from_dataset(ds)))
        assert sft["input_ids"][0].tolist() == ids_of(qwen3, off + "7<|im_end|>")
