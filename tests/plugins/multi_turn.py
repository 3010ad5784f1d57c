"""A multi-turn workflow, in the style of AReaL-lite's MultiTurnWorkflow: answer; while the reward is 0, a user turn
says so and the model answers again on the whole conversation, up to ``max_turns``; the reward is discounted per turn.

One trajectory per sample: the prompt, then every turn's answer and the feedback between them. The feedback tokens are
the environment's: ``loss_mask`` 0 (no loss, no staleness). Load it with ``trainer.plugins=[tests/plugins/multi_turn.py]
rollout.workflow=multi_turn``."""

import asyncio

from areal_hpc.config.schema import SGLANG_INPUT_MARGIN
from areal_hpc.rollout import Group, Trajectory, register_workflow
from areal_hpc.rollout.workflow import RLVRWorkflow

PROBE = "areal-hpc-probe"  # an assistant reply, to find what the chat template puts after one


@register_workflow("multi_turn")
class MultiTurnWorkflow(RLVRWorkflow):
    max_turns = 3
    turn_discount = 0.9
    feedback = "Your answer is wrong. Try again."

    def between_turns(self, answer_ids):
        """The tokens that close the model's answer and give the feedback, ending where its next answer begins."""
        tok = self.tokenizer
        if not self.prompts.uses_template:  # raw text: the feedback on a line of its own
            return tok.encode("\n" + self.feedback + "\n", add_special_tokens=False)
        talk = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": PROBE}]
        before = tok.apply_chat_template(talk, tokenize=False)
        after = tok.apply_chat_template(talk + [{"role": "user", "content": self.feedback}], tokenize=False,
                                        add_generation_prompt=True)
        ids = tok.encode(after[after.index(PROBE) + len(PROBE):], add_special_tokens=False)  # "<eot>\n<user>..."
        if answer_ids and ids and answer_ids[-1] == ids[0]:  # the answer ended with the end-of-turn token itself
            ids = ids[1:]
        return ids

    def answer_text(self, res):
        """What the reward reads: the answer less the stop token that ended it (SGLang's text has none)."""
        stops = set(self.params.get("stop_token_ids") or [])
        ids = res.output_ids
        if res.finish_reason == "stop" and ids and ids[-1] in stops:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def one_sample(self, client, row, prompt_ids):
        context = getattr(self, "context_length", 0)  # the servers', when the run gives it
        longest = context - SGLANG_INPUT_MARGIN if context else None  # a longer input is refused (HTTP 400)
        prompt = self.prompts.prompt_text(row)
        own = (self.prompt_key, self.answer_key, "prompt", "completion", "answer")
        extras = {k: v for k, v in row.items() if k not in own}  # the reward's keyword arguments
        input_ids, out, logprobs, versions, mask = list(prompt_ids), [], [], [], []
        reward, finish, turns = 0.0, "length", 0
        while turns < self.max_turns:
            max_new = self.params["max_new_tokens"]
            if longest is not None:
                max_new = min(max_new, longest - len(input_ids))
            if max_new < 1:  # the conversation fills the context: the episode ends here, cut short
                finish = "length"
                break
            res = await client.generate(input_ids, self.params, max_new_tokens=max_new)
            turns += 1
            out += res.output_ids
            logprobs += res.logprobs
            versions += res.versions
            mask += [1] * len(res.output_ids)
            finish = res.finish_reason
            [reward] = await self.scorer.score(prompt, [self.answer_text(res)], row.get(self.answer_key, ""), extras)
            if reward > 0 or turns == self.max_turns:
                break
            env = self.between_turns(res.output_ids)
            if longest is not None and len(input_ids) + len(res.output_ids) + len(env) >= longest:
                finish = "length"  # no room for another answer
                break
            out += env
            logprobs += [0.0] * len(env)
            versions += [-1] * len(env)  # no policy's
            mask += [0] * len(env)
            input_ids += res.output_ids + env
        return Trajectory(prompt_ids=list(prompt_ids), output_ids=out, logprobs=logprobs, versions=versions,
                          reward=reward * self.turn_discount ** max(0, turns - 1), finish_reason=finish,
                          loss_mask=mask, info={"turns": turns})

    async def arun_episode(self, client, row):
        prompt_ids = self.prompts.encode(row)
        samples = await asyncio.gather(*(self.one_sample(client, row, prompt_ids) for _ in range(self.n_samples)))
        return Group(trajectories=list(samples))
