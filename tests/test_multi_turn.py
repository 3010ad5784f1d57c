"""The multi-turn workflow example (tests/plugins/multi_turn.py) in real local runs: the quickstart's toy model and
dataset, real `hf` server, real trainer. A wrong answer gets a feedback turn whose tokens carry ``loss_mask`` 0."""

from pathlib import Path

from test_e2e_local import SMALL, metrics, run_dir, submit

PLUGIN = Path(__file__).resolve().parent / "plugins" / "multi_turn.py"
MULTI_TURN = [f"trainer.plugins=[{PLUGIN}]", "rollout.workflow=multi_turn", "saver.freq_steps=0"]


def test_multi_turn_run_trains_on_the_model_tokens_only(tmp_path):
    # a random-init model answers "a+b=" right about one time in ten: most samples get feedback turns. Staleness 0: no
    # weight update lands inside an episode, so no sample's model tokens carry two versions
    submit(tmp_path, *MULTI_TURN, *SMALL[:2], "trainer.total_train_steps=3", "rollout.workflow_args.max_turns=2",
           "rollout.max_head_offpolicyness=0", timeout=300)
    rows = metrics(run_dir(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # each completion: 1 or 2 answers (max_turns=2) of 1 token, the feedback between them; trained: the answers
        assert r["n_tokens"] <= 2 * r["n_trajectories"] < r["completion_len_mean"] * r["n_trajectories"], r
        # the metrics of generation count the model's tokens: the feedback was not generated, and has no version
        assert r["gen_tokens"] == r["n_tokens"], r
        assert r["mixed_version_frac"] == 0, r


def test_a_conversation_that_fills_the_context_ends_cut_short(tmp_path):
    # "a+b=" (4 tokens), answers of 1, feedback of 34: a third answer's input (74 tokens) would pass 64 - 6
    submit(tmp_path, *MULTI_TURN, *SMALL[:2], "trainer.total_train_steps=2", "server.context_length=64",
           "train_dataset.max_prompt_len=8", "valid_dataset.max_prompt_len=8", timeout=300)
    rows = metrics(run_dir(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # two answers at most, and a sample still wrong after them ends cut short ("length")
        assert r["n_tokens"] <= 2 * r["n_trajectories"] and r["truncated_frac"] > 0.5, r
        assert r["completion_len_mean"] <= 1 + 34 + 1, r


def test_weight_updates_land_inside_multi_turn_episodes(tmp_path):
    # 3 answers of 150 tokens (ignore_eos: never right) per sample: weight updates land between and inside turns; each
    # turn's tokens keep the version that generated them, and staleness counts the model's tokens only
    submit(tmp_path, *MULTI_TURN, "rollout.batch_size=2", "rollout.n_samples=2", "rollout.max_head_offpolicyness=1",
           "rollout.gen.max_new_tokens=150", "rollout.gen.ignore_eos=True", "trainer.total_train_steps=5",
           "server.max_running_requests=4", timeout=300)
    rows = metrics(run_dir(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["n_tokens"] == r["gen_tokens"] == 3 * 150 * r["n_trajectories"] for r in rows), rows
    assert all(r["staleness_max"] <= 1 for r in rows), rows
    assert max(r["mixed_version_frac"] for r in rows) > 0, rows


def test_the_feedback_turn_follows_the_chat_template(tmp_path):
    """With a template (ChatML), the tokens between two answers close the answer and open a user turn, then the
    assistant's: the conversation reads as the template renders it."""
    from chatml import build_chatml_tokenizer
    from plugins.multi_turn import MultiTurnWorkflow

    tok = build_chatml_tokenizer(tmp_path)
    wf = MultiTurnWorkflow(tok, {"max_new_tokens": 8})
    answer = tok.encode("7", add_special_tokens=False)
    talk = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": wf.feedback}]
    whole = tok.apply_chat_template(talk, tokenize=False, add_generation_prompt=True)
    ids = wf.prompts.encode({"prompt": "3+4="})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for ended in ([], [end]):  # cut short (length), or ended by its end-of-turn token (kept in output_ids)
        assert tok.decode(ids + answer + ended + wf.between_turns(answer + ended)) == whole


def test_a_setting_the_workflow_lacks_is_refused_at_submit(tmp_path):
    """`rollout.workflow_args` sets a workflow's class attributes: a name it lacks (a typo) is refused at submit."""
    r = submit(tmp_path, *MULTI_TURN, "rollout.workflow_args.max_turn=2", check=False, timeout=120)
    assert r.returncode == 2 and "rollout.workflow_args.max_turn" in r.stderr and "max_turns" in r.stderr, r.stderr
