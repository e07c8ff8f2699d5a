"""Policy: sampling loop, masked log-probs, value head, save/load — on a tiny random Llama."""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cory.generation.sampling import Generation, SamplingParams, filter_top_k_top_p, sample_categorical
from cory.policy import Policy, PolicyModel
from cory.scoring import Scorer, sequence_logprobs

WORDS = ("the a cat dog sat ran on in mat park hello world good bad movie plot great awful "
         "stop here and but very so it was is").split()
# Different lengths, so the batch is left-padded.
PROMPTS = ["the cat", "a dog ran in the park and", "hello", "good movie but the plot was"]


@pytest.fixture(scope="module", autouse=True)
def policy_one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads
    waiting on each other's barrier make these tests several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def policy_tokenizer():
    """A BPE tokenizer (Metaspace, like sentencepiece models) trained here on random sentences."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(80)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<eos>", "<unk>"])
    tok.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # Larger than the default 0.02 so next-token distributions are peaked (no argmax near-ties)
        # while EOS (1 token in ~100) still ends some rows early and not others.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def policy(policy_tokenizer):
    return Policy(make_lm(policy_tokenizer), policy_tokenizer, value_head=True)


def score(policy, gen, temperature=1.0, **outputs):
    """The policy's scoring of a generation (log-probs, and entropy, values, distributions if asked)."""
    return Scorer(policy.module, temperature)(gen, **outputs)


def masked_max_abs(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


# ---- generation-time log-probs == training-time log-probs ------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_generation_logprobs_match_recomputation(policy, temperature):
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_k=30, top_p=0.9)
    gen = policy.generate(PROMPTS * 3, params, torch.Generator().manual_seed(1))

    # The case must exercise left padding, right padding and both ways of ending.
    assert (gen.query_mask == 0).any()
    lengths = gen.response_mask.sum(-1)
    assert lengths.min() < gen.response_ids.shape[1] and gen.finished.any() and (~gen.finished).any()

    out = sequence_logprobs(policy.module, gen.query_ids, gen.query_mask, gen.response_ids,
                            gen.response_mask, temperature=temperature)
    assert masked_max_abs(out.logprobs, gen.logprobs, gen.response_mask) < 1e-4
    assert (out.logprobs[gen.response_mask == 0] == 0).all()
    assert (gen.logprobs[gen.response_mask == 0] == 0).all()


def test_greedy_equals_uncached_argmax_continuation(policy, policy_tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    gen = policy.generate(PROMPTS, params)
    eos = policy_tokenizer.eos_token_id
    for i, prompt in enumerate(PROMPTS):
        # One prompt at a time, no padding, full forward each step: the reference continuation.
        ids = policy_tokenizer(prompt, return_tensors="pt").input_ids
        expected = []
        for _ in range(params.max_new_tokens):
            with torch.no_grad():
                token = policy.model(input_ids=ids).logits[0, -1].argmax().item()
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
        n = int(gen.response_mask[i].sum())
        assert gen.response_ids[i, :n].tolist() == expected


def test_greedy_logprobs_are_taken_at_temperature_one(policy):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    out = score(policy, gen, temperature=1.0)
    assert masked_max_abs(out.logprobs, gen.logprobs, gen.response_mask) < 1e-4


def test_same_seed_same_samples_different_seed_different(policy):
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    a = policy.generate(PROMPTS, params, torch.Generator().manual_seed(7))
    b = policy.generate(PROMPTS, params, torch.Generator().manual_seed(7))
    c = policy.generate(PROMPTS, params, torch.Generator().manual_seed(8))
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert torch.equal(a.logprobs, b.logprobs)
    assert a.response_ids.shape != c.response_ids.shape or not torch.equal(a.response_ids,
                                                                          c.response_ids)


# ---- ending: EOS, stop strings, max_new_tokens --------------------------------------------------------


def test_eos_zeroes_the_rest_of_the_row_and_sets_finished(policy, policy_tokenizer):
    eos, pad = policy_tokenizer.eos_token_id, policy_tokenizer.pad_token_id

    def force_eos_in_row0_at_step2(step, logprobs):
        logits = logprobs.clone()
        logits[1:, eos] = float("-inf")  # other rows never end
        if step == 2:
            logits[0, eos] = 1e4
        return logits

    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=8),
                          torch.Generator().manual_seed(0), logits_hook=force_eos_in_row0_at_step2)
    assert gen.response_ids.shape == (len(PROMPTS), 8)
    assert gen.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # the EOS token is kept
    assert gen.response_ids[0, 2] == eos and (gen.response_ids[0, 3:] == pad).all()
    assert (gen.logprobs[0, 3:] == 0).all()
    # The recorded log-prob is that of the distribution actually sampled (the hooked one).
    assert gen.logprobs[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert gen.finished.tolist() == [True, False, False, False]
    assert (gen.response_mask[1:] == 1).all()


def test_stops_early_when_every_row_is_done(policy, policy_tokenizer):
    eos = policy_tokenizer.eos_token_id

    def always_eos(step, logprobs):
        logits = torch.full_like(logprobs, float("-inf"))
        logits[:, eos] = 0.0
        return logits

    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=10), logits_hook=always_eos)
    assert gen.response_ids.shape == (len(PROMPTS), 1) and gen.finished.all()
    assert gen.texts == [""] * len(PROMPTS)


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_max_new_tokens_respected(policy, max_new_tokens):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens),
                          torch.Generator().manual_seed(0))
    assert gen.response_ids.shape[1] <= max_new_tokens
    assert (gen.response_mask.sum(-1) <= max_new_tokens).all()


def test_stop_string_cuts_the_response(policy, policy_tokenizer):
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    free = policy.generate(PROMPTS, params, torch.Generator().manual_seed(3))
    # Use a piece of row 0's own continuation as the stop string, so we know it will occur.
    stop = policy_tokenizer.decode(free.response_ids[0, 3:5]).strip()
    assert stop and stop in free.texts[0]

    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=1.0,
                                                  stop_strings=(stop,)),
                          torch.Generator().manual_seed(3))
    for i in range(len(PROMPTS)):
        n = int(gen.response_mask[i].sum())
        if stop in free.texts[i]:
            # Same random stream, so the row is the free row cut right where the stop string ends.
            assert gen.finished[i]
            assert gen.texts[i] == free.texts[i][: free.texts[i].index(stop)]
            kept = policy_tokenizer.decode(gen.response_ids[i, :n], skip_special_tokens=True)
            assert stop in kept and stop not in policy_tokenizer.decode(gen.response_ids[i, :n - 1])
            assert (gen.response_mask[i, n:] == 0).all()
        else:
            assert gen.texts[i] == free.texts[i]
        assert stop not in gen.texts[i]


# ---- sequence_logprobs: entropy, values, full log-probs, bare LMs ----------------------------------


def test_entropy_matches_hand_computation(policy):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(0))
    out = score(policy, gen, temperature=0.7, with_entropy=True, with_full_logprobs=True)

    # Response token 2 of row 1 is predicted by the prefix up to and including token 1.
    row, t = 1, 2
    assert gen.response_mask[row, t] == 1
    q = gen.query_ids[row][gen.query_mask[row].bool()]
    prefix = torch.cat([q, gen.response_ids[row, :t]])[None]
    with torch.no_grad():
        logits = policy.model(input_ids=prefix).logits[0, -1]
    p = torch.softmax(logits / 0.7, -1)
    assert out.entropy[row, t].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)
    assert torch.allclose(out.full_logprobs[row, t], p.log(), atol=1e-5)
    gathered = out.full_logprobs.gather(-1, gen.response_ids[..., None])[..., 0]
    assert torch.allclose(gathered, out.logprobs)
    assert (out.entropy[gen.response_mask == 0] == 0).all()
    assert (out.full_logprobs[gen.response_mask == 0] == 0).all()


def test_values_are_aligned_and_value_head_gets_gradients(policy):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=8), torch.Generator().manual_seed(0))
    with torch.no_grad():  # give the zero-initialised head something to say
        policy.module.value_head.weight.normal_()
    out = score(policy, gen, with_values=True)
    b, lr = gen.response_ids.shape
    assert out.values.shape == (b, lr) and out.values.dtype == torch.float32

    # values[:, t] is the value at the column that predicts response token t (column Lq - 1 + t).
    lq = gen.query_ids.shape[1]
    ids = torch.cat([gen.query_ids, gen.response_ids], 1)
    mask = torch.cat([gen.query_mask, gen.response_mask], 1)
    _, all_values = policy.module(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    expected = torch.where(gen.response_mask.bool(), all_values[:, lq - 1: lq - 1 + lr], 0.0)
    assert torch.allclose(out.values, expected, atol=1e-5)

    loss = ((out.values - 1.0) ** 2 * gen.response_mask).sum()
    loss.backward()
    head = policy.module.value_head
    assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0


def test_value_head_starts_at_zero(policy_tokenizer):
    module = PolicyModel(make_lm(policy_tokenizer), value_head=True)
    ids = torch.tensor([[3, 4, 5]])
    logits, values = module(ids, torch.ones_like(ids))
    assert logits.shape == (1, 3, len(policy_tokenizer)) and torch.equal(values, torch.zeros(1, 3))
    assert PolicyModel(make_lm(policy_tokenizer))(ids, torch.ones_like(ids))[1] is None


def test_sequence_logprobs_accepts_a_bare_hf_lm(policy, policy_tokenizer):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=8), torch.Generator().manual_seed(0))
    reference = make_lm(policy_tokenizer)  # same seed -> same weights as the policy's LM
    ref = sequence_logprobs(reference, gen.query_ids, gen.query_mask, gen.response_ids,
                            gen.response_mask, with_entropy=True)
    mine = score(policy, gen, with_entropy=True)
    assert torch.allclose(ref.logprobs, mine.logprobs, atol=1e-5)
    assert torch.allclose(ref.entropy, mine.entropy, atol=1e-5)
    with pytest.raises(ValueError, match="value_head=True"):
        sequence_logprobs(reference, gen.query_ids, gen.query_mask, gen.response_ids,
                          gen.response_mask, with_values=True)


class DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel: holds the model in `.module`, forwards through it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_sequence_logprobs_through_a_ddp_style_wrapper(policy):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(0))
    wrapped = sequence_logprobs(DDPLike(policy.module), gen.query_ids, gen.query_mask,
                                gen.response_ids, gen.response_mask, with_values=True)
    direct = score(policy, gen, with_values=True)
    assert torch.equal(wrapped.logprobs, direct.logprobs)
    assert torch.equal(wrapped.values, direct.values)


def test_a_scorer_scores_the_rows_it_is_given(policy):
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    rows = torch.tensor([2, 0])
    part = score(policy, gen, rows=rows).logprobs
    whole = score(policy, gen).logprobs
    assert torch.allclose(part, whole[rows], atol=1e-6)


# ---- sampling filters ----------------------------------------------------------------------------


def test_top_k_and_top_p_filter_the_right_tokens():
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda lp: torch.isfinite(lp)[0].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logprobs, top_k=2)) == [True, True, False, False]
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two.
    assert kept(filter_top_k_top_p(logprobs, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_top_k_top_p(logprobs, top_p=0.1)) == [True, False, False, False]
    assert kept(filter_top_k_top_p(logprobs, top_k=3, top_p=0.99)) == [True, True, True, False]


def test_sample_categorical_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20000, 5)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0], atol=0.015)


# ---- save / load ---------------------------------------------------------------------------------


def test_save_pretrained_is_a_plain_hf_folder(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, policy.model(input_ids=ids).logits)


def test_from_pretrained_round_trips_the_value_head(policy, tmp_path):
    with torch.no_grad():
        policy.module.value_head.weight.normal_()
        policy.module.value_head.bias.fill_(0.25)
    policy.save_pretrained(tmp_path)

    loaded = Policy.from_pretrained(str(tmp_path))  # value_head=False, but the folder has one
    assert loaded.module.value_head is not None
    assert torch.equal(loaded.module.value_head.weight, policy.module.value_head.weight)
    assert torch.equal(loaded.module.value_head.bias, policy.module.value_head.bias)
    assert loaded.tokenizer.padding_side == "left"
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    a, b = score(policy, gen, with_values=True), score(loaded, gen, with_values=True)
    assert torch.allclose(a.values, b.values) and torch.allclose(a.logprobs, b.logprobs)


def test_from_pretrained_with_dtype(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = Policy.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    gen = loaded.generate(PROMPTS, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    out = score(loaded, gen, with_values=True)
    assert out.logprobs.dtype == torch.float32 and out.values.dtype == torch.float32


def test_generation_and_scoring_with_a_lora_adapter(policy):
    from peft import LoraConfig, get_peft_model

    policy.model = get_peft_model(policy.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    gen = policy.generate(PROMPTS, params, torch.Generator().manual_seed(0))
    out = score(policy, gen, with_values=True)
    assert masked_max_abs(out.logprobs, gen.logprobs, gen.response_mask) < 1e-4
    out.logprobs.sum().backward()
    lora_grads = [p.grad for n, p in policy.module.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_from_pretrained_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Policy.from_pretrained(str(tmp_path / "no-such-model"))


# ---- input checks --------------------------------------------------------------------------------


def test_prompts_as_token_ids_and_bad_prompts(policy, policy_tokenizer):
    ids = [policy_tokenizer(p).input_ids for p in PROMPTS]
    params = SamplingParams(max_new_tokens=5)
    a = policy.generate(PROMPTS, params, torch.Generator().manual_seed(0))
    b = policy.generate(ids, params, torch.Generator().manual_seed(0))
    assert isinstance(b, Generation) and torch.equal(a.response_ids, b.response_ids)
    with pytest.raises(TypeError):
        policy.generate("a single string", params)
    with pytest.raises(ValueError, match="no tokens"):
        policy.generate([[3, 4], []], params)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_pad_token_falls_back_to_eos(policy_tokenizer):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=policy_tokenizer.backend_tokenizer,
                                        eos_token="<eos>")
    assert tokenizer.pad_token_id is None
    policy = Policy(make_lm(policy_tokenizer), tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "left"
    gen = policy.generate(PROMPTS, SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0))
    assert gen.response_ids.shape[0] == len(PROMPTS)
