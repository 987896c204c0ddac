"""CLIP BPE tokenizers built in code from a word list (no download): the tiny and embedded models'.

Every word of the list is one token, so attention maps of a word are one column.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

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
