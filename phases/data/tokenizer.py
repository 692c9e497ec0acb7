"""A byte-level BPE trained with ``tokenizers`` on the curriculum, loadable as PreTrainedTokenizerFast.

Byte-level means every string round-trips exactly: no unknown token, no normalisation. Digits are
split into single tokens before BPE sees them: with merged multi-digit tokens a small model has to
learn each token's digit-by-digit arithmetic separately, with one token per digit it learns the digit rule once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS)


def save(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """tokenizer.json plus the transformers config, so AutoTokenizer.from_pretrained(out_dir) works."""
    tokenizer.save_pretrained(str(out_dir))


def load(path: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def roundtrip_rate(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    ok = sum(tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) == t for t in texts)
    return ok / max(1, len(texts))


def chars_per_token(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    n_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return sum(len(t) for t in texts) / max(1, n_tokens)
