"""Byte-level BPE tokenizers trained on a zoo corpus, wrapped as HF fast tokenizers.

Byte-level BPE is lossless (``decode(encode(x)) == x`` for any string) and never needs an unknown
token, so text a policy writes always survives the round trip to a reward model.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
# Ids are fixed by the order the trainer receives the special tokens.
PAD_ID, EOS_ID = 0, 1


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over ``texts`` with ``<pad>`` (id 0) and ``<eos>`` (id 1).

    ``<eos>`` doubles as the beginning-of-sequence token (as GPT-2's ``<|endoftext|>`` does), but
    nothing is added automatically: ``tokenizer(text)`` gives exactly the tokens of ``text``, so
    left-padded batched prompts carry no stray special tokens.
    """
    backend = Tokenizer(models.BPE())
    # No prefix space: "The" at the start of a text and " the" inside one are distinct tokens,
    # and a prompt tokenizes exactly like the start of the text it was cut from.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    assert backend.token_to_id(PAD) == PAD_ID and backend.token_to_id(EOS) == EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
