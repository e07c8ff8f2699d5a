"""Chat templates: prompts rendered as user turns, responses stopped at the end-of-turn token,
the same rendering in training, evaluation and CORY's observer."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cory.config import load_config

from cory.errors import UsageError
from cory.tasks.pioneer_observer import CHAT_TEMPLATE, observer_prompts
from cory.generation.sampling import SamplingParams
from cory.policy import Policy
from cory.build import eval_params, sampling_params

@pytest.fixture(scope="module")
def chat_policy(smollm2):
    """SmolLM2's tokenizer and chat template on a one-layer random Llama of its vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.eos_token = "<|endoftext|>"  # so that only the chat rendering knows <|im_end|> ends a turn
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Policy(LlamaForCausalLM(config).eval(), tokenizer)


def rendered(policy, prompt: str, params: SamplingParams) -> list[int]:
    """The query ids of one prompt as `Policy.encode_prompts` renders it."""
    ids, mask = policy.encode_prompts([prompt], params)
    return ids[0][mask[0].bool()].tolist()


def test_prompts_render_as_user_turns_after_system_and_example_turns(chat_policy):
    tok = chat_policy.tokenizer
    params = SamplingParams(max_new_tokens=2, chat=True, system_prompt="good", chat_examples=(("hi", "there"),))
    ids = rendered(chat_policy, "what is two", params)
    expected = ("<|im_start|>system\ngood<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                "<|im_start|>assistant\nthere<|im_end|>\n<|im_start|>user\nwhat is two<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.decode(ids) == expected
    gen = chat_policy.generate(["what is two", "hi"], params, torch.Generator().manual_seed(0))
    row = gen.query_ids[0][gen.query_mask[0].bool()].tolist()
    assert row == ids
    assert chat_policy.end_of_turn_ids() == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.convert_tokens_to_ids("<|im_end|>") in chat_policy.stop_ids(params)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in chat_policy.stop_ids(SamplingParams())


class ForceAt:
    """A logits hook that makes `token` certain at `step` (and impossible before)."""

    def __init__(self, token, step):
        self.token, self.step = token, step

    def __call__(self, step, logprobs):
        out = logprobs.clone()
        out[:, self.token] = 0.0 if step == self.step else float("-inf")
        if step == self.step:
            out[:, : self.token] = float("-inf")
            out[:, self.token + 1 :] = float("-inf")
        return out


def test_chat_generation_stops_at_the_end_of_turn_token_and_plain_does_not(chat_policy):
    end = chat_policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = chat_policy.generate(["hi", "what is two"], SamplingParams(max_new_tokens=8, chat=True),
                                torch.Generator().manual_seed(0), logits_hook=ForceAt(end, 2))
    assert chat.finished.all() and chat.response_mask.sum(-1).tolist() == [3, 3]
    assert (chat.response_ids[:, 2] == end).all()
    assert all("<|im_end|>" not in t for t in chat.texts)
    plain = chat_policy.generate(["hi", "what is two"], SamplingParams(max_new_tokens=8),
                                 torch.Generator().manual_seed(0), logits_hook=ForceAt(end, 2))
    assert plain.response_mask.sum(-1).tolist() == [8, 8]


def test_system_prompt_without_chat_is_refused():
    with pytest.raises(ValueError, match="chat=True"):
        SamplingParams(system_prompt="be nice")
    with pytest.raises(UsageError, match="task.chat_template"):
        load_config(overrides=["task.system_prompt=be nice"])


def test_training_and_evaluation_render_alike_and_arithmetic_gets_its_one_shot():
    cfg = load_config(overrides=["task.chat_template=true", "task.system_prompt=Be brief.", "task.name=arithmetic"])
    train, evaluation = sampling_params(cfg), eval_params(cfg)
    for params in (train, evaluation):
        assert params.chat and params.system_prompt == "Be brief."
        [(user, assistant)] = params.chat_examples
        assert user.startswith("Question: ") and assistant.endswith("The answer is 12.")
    env = load_config(overrides=["env.id=cory/Bandit-v0", "env.chat_template=true", "task.chat_template=false"])
    assert sampling_params(env).chat and sampling_params(env).chat_examples == ()


def test_cory_observer_prompt_in_chat_form_holds_the_prompt_and_the_pioneer_answer():
    [prompt] = observer_prompts(["What is 2 + 3?"], ["It is 6."], "chat")
    assert prompt == CHAT_TEMPLATE.format(prompt="What is 2 + 3?", reference="It is 6.")
    assert prompt.startswith("What is 2 + 3?") and "It is 6." in prompt


def test_shared_prefix_prefill_samples_what_the_plain_prefill_samples(chat_policy):
    """The prefix every prompt shares (system and example turns, instructions) is run once; rows of
    different lengths then sample the same tokens with the same log-probs as from a full prefill."""
    prompts = ["Pick one of the buttons blue or red and answer ACTION=X. " + tail
               for tail in ("Step=1 Action=red Reward=0.40", "go", "Step=1 Action=blue Reward=1.00\nStep=2 Action=red Reward=-0.2")]
    base = SamplingParams(max_new_tokens=6, chat=True, system_prompt="Answer briefly.", chat_examples=(("hi", "ACTION=red"),))
    shared = SamplingParams(**{**base.__dict__, "shared_prefix": True})
    plain = chat_policy.generate(prompts, base, torch.Generator().manual_seed(1))
    cached = chat_policy.generate(prompts, shared, torch.Generator().manual_seed(1))
    assert torch.equal(plain.query_ids, cached.query_ids) and torch.equal(plain.query_mask, cached.query_mask)
    assert torch.equal(plain.response_ids, cached.response_ids)
    assert torch.allclose(plain.logprobs, cached.logprobs, atol=1e-5)
    assert not torch.equal(plain.logprobs, torch.zeros_like(plain.logprobs))


def test_env_chat_examples_reach_sampling_and_need_the_chat_template(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"env": {"id": "cory/Bandit-v0", "chat_template": True,
                                            "chat_examples": [["Which one?\nSay ACTION=X.", "ACTION=red"]]}}))
    assert sampling_params(load_config(path)).chat_examples == (("Which one?\nSay ACTION=X.", "ACTION=red"),)
    with pytest.raises(UsageError, match="env.chat_template"):
        load_config(overrides=["env.id=cory/Bandit-v0", "env.chat_examples=[[a,b]]"])
    with pytest.raises(UsageError, match="pairs"):
        load_config(overrides=["env.id=cory/Bandit-v0", "env.chat_template=true", "env.chat_examples=[[a]]"])
    with pytest.raises(UsageError, match="shared_prefix"):
        load_config(overrides=["generation.shared_prefix=true", "generation.backend=vllm"])


def test_action_scores_in_chat_form_are_the_log_likelihoods_of_the_rendered_answer(chat_policy):
    from cory.metrics.model_probes import action_scorer

    params = SamplingParams(chat=True, system_prompt="Answer briefly.")
    texts = ["ACTION=blue", "ACTION=red", "ACTION=light-green"]
    scores = action_scorer(chat_policy, batch_size=2, params=params)("Which button?", texts)
    prompt_ids = rendered(chat_policy, "Which button?", params)
    for text, score in zip(texts, scores):
        text_ids = chat_policy.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = chat_policy.model(input_ids=torch.tensor([prompt_ids + text_ids])).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1)
        assert score == pytest.approx(sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(text_ids)), abs=1e-4)


def test_a_frozen_prefix_is_reused_across_calls_and_changes_nothing(chat_policy):
    """Inside `frozen_prefix`, later calls run only what differs from the last shared prefix (here the
    step count and history differ); samples and action scores equal the plain ones."""
    params = SamplingParams(max_new_tokens=4, chat=True, system_prompt="Answer briefly.", shared_prefix=True)
    calls = [[f"Pick blue or red, ACTION=X. So far {n} steps. " + t for t in ("Step=1 red", "Step=1 blue 1.0")] for n in (1, 2, 3)]
    plain = [chat_policy.generate(p, params, torch.Generator().manual_seed(i)) for i, p in enumerate(calls)]
    with chat_policy.frozen_prefix():
        reused = [chat_policy.generate(p, params, torch.Generator().manual_seed(i)) for i, p in enumerate(calls)]
        assert len(chat_policy.prefix_store.tokens) > 16
    assert chat_policy.prefix_store is None
    for a, b in zip(plain, reused):
        assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    from cory.metrics.model_probes import action_scorer

    texts = ["ACTION=blue", "ACTION=red"]
    want = [x for p in calls for x in action_scorer(chat_policy, params=params)(p[0], texts)]
    with chat_policy.frozen_prefix():
        got = [x for p in calls for x in action_scorer(chat_policy, params=params)(p[0], texts)]
    assert got == pytest.approx(want, abs=1e-4)


def test_scoring_with_the_shared_prefix_run_once_equals_the_full_pass_and_its_gradients(smollm2):
    """`sequence_logprobs(shared_prefix=True)` runs the system and example turns once for the batch:
    log-probs, entropy, values, whole distributions and the gradients of LoRA weights, value head and
    trunk equal the full pass's; the LM sees (B - 1) x prefix fewer tokens; the frozen base seen
    through AdaptersDisabled (the LoRA reference) gives the same distributions both ways."""
    from peft import get_peft_model

    from cory.generation.native import shared_prefix_length
    from cory.lora import AdaptersDisabled, peft_config
    from cory.scoring import sequence_logprobs

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    policy = Policy(LlamaForCausalLM(config), tokenizer, value_head=True)
    torch.nn.init.normal_(policy.module.value_head.weight, std=0.3)
    policy.model = get_peft_model(policy.model, peft_config(4, 8, ["q_proj", "v_proj", "down_proj"]))
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # adapters that change the output
        if "embed_tokens" in name:
            p.requires_grad_(True)  # the trunk too: its gradient gathers over every row's use of the prefix
    policy.module.train()
    params = SamplingParams(chat=True, system_prompt="Answer briefly.", chat_examples=(("hi", "Hello."),))
    query_ids, query_mask = policy.encode_prompts(["What is 2 + 3?", "Name a colour.", "Count to three, slowly please."], params)
    prefix = shared_prefix_length(query_ids, query_mask)
    assert prefix >= 16
    response_ids = torch.randint(0, len(tokenizer), (3, 5), generator=torch.Generator().manual_seed(0))
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = policy.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))

    def run(shared: bool):
        policy.module.zero_grad(set_to_none=True)
        seen.clear()
        out = sequence_logprobs(policy.module, query_ids, query_mask, response_ids, response_mask, temperature=0.7,
                                with_entropy=True, with_values=True, with_full_logprobs=True, shared_prefix=shared)
        ((out.logprobs * weights).sum() + out.values.pow(2).sum() + out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None}
        return out, grads, sum(seen)

    (full, full_grads, full_tokens), (cached, cached_grads, cached_tokens) = run(False), run(True)
    hook.remove()
    assert full_tokens - cached_tokens == 2 * prefix
    for name in ("logprobs", "entropy", "values", "full_logprobs"):
        assert torch.allclose(getattr(full, name), getattr(cached, name), atol=1e-5), name
    assert full_grads.keys() == cached_grads.keys() and any("lora_B" in n for n in full_grads)
    assert any("embed_tokens" in n for n in full_grads) and any("value_head" in n for n in full_grads)
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name
        # float rounding only: summed over every row's use of the prefix, entries differ by ~1e-7 of the largest
        assert (grad - cached_grads[name]).abs().max() <= 1e-5 * grad.abs().max(), name
    reference = AdaptersDisabled(policy.model)
    with torch.no_grad():
        ref = [sequence_logprobs(reference, query_ids, query_mask, response_ids, response_mask, with_full_logprobs=True,
                                 shared_prefix=s).full_logprobs for s in (False, True)]
        adapted = sequence_logprobs(policy.model, query_ids, query_mask, response_ids, response_mask, with_full_logprobs=True)
    assert torch.allclose(ref[0], ref[1], atol=1e-5) and not torch.allclose(ref[0], adapted.full_logprobs, atol=1e-3)
