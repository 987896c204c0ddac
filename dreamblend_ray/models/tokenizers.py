"""CLIP BPE tokenizers built in code from a word list (no download): the tiny and embedded models'.

Every word of the list is one token, so attention maps of a word are one column.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5TokenizerFast

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def apply_bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i, pair) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, _, best = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of ``words`` is one token.

    Each word is encoded with the merges so far; while it is still split, the merge of its first
    two pieces is appended. An appended merge has the lowest priority, so it only fires where
    encoding used to stop: words that were already one token stay one token, whatever the order
    (a merge from one word can no longer split another). Single characters (with and without the
    end-of-word mark) stay in the vocabulary, so any other text still tokenizes.
    """
    chars = [chr(c) for c in range(33, 127)]
    vocab_tokens = list(SPECIAL_TOKENS) + chars + [c + "</w>" for c in chars]
    known = set(vocab_tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        parts = apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab_tokens.append(pair[0] + pair[1])
            parts = apply_bpe(parts, ranks)
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    return vocab, merges


def build_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    vocab, merges = word_bpe(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


TINY_WORDS = (
    "a photo of sks dog cat toy on the beach in snow with red blue green yellow hat wearing "
    "grass city forest background painting style".split()
)


T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
_METASPACE = "\u2581"


def build_t5_tokenizer(words: list[str], max_length: int):
    """A T5 tokenizer (``T5TokenizerFast``) built in code with the ``tokenizers`` library: a Unigram
    model in which every word of ``words`` is one token (after T5's metaspace), lower-case letters
    and digits as fallback pieces, ``</s>`` appended to every sequence and ``<pad>`` = 0, as T5's
    own tokenizer does. No hub, no sentencepiece file; ``save_pretrained`` writes ``tokenizer.json``.
    """
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    pieces += [(_METASPACE + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [(_METASPACE, -2.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    model = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)
