"""A CLIP-style byte-level BPE tokenizer learned from the caption grammar's corpus.

The folder it writes is a stock ``transformers.CLIPTokenizer`` folder. The vocabulary holds all 256 byte symbols, with and
without the end-of-word marker, so a word the grammar never used (an identifier such as "sks")
still tokenizes, into pieces or single characters.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from studio.world.concepts import HELD_OUT_STYLES
from studio.world.grammar import VOCABULARY

EOW = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


# The embedded model's tokenizer was learned when the held-out styles were these four fine textures; they stay in the
# corpus, and the later held-out style names stay out, so that building it again gives the shipped tokenizer (the
# text encoders' token ids). A held-out style name is never in the base model's captions: it tokenizes into pieces,
# as any word the base model never saw.
FIRST_HELD_OUT_STYLES: tuple[str, ...] = ("checkered", "zigzag", "wavy", "mosaic")


def corpus_words() -> list[str]:
    """The words the tokenizer learns as single tokens: the grammar's, held-out styles as when it was first built."""
    return sorted(set(VOCABULARY) - set(HELD_OUT_STYLES) | set(FIRST_HELD_OUT_STYLES))


def _corpus() -> Counter:
    """Word frequencies of the grammar; every vocabulary word once is enough to learn its merges."""
    words = Counter(corpus_words())
    words.update([",", "."])
    return words


def learn_merges(words: Counter) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) until every corpus word is one symbol."""
    byte_map = bytes_to_unicode()
    split = {
        w: tuple(byte_map[b] for b in w.encode("utf-8"))[:-1] + (byte_map[w.encode("utf-8")[-1]] + EOW,)
        for w in words
    }
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[w]
        if not pairs:
            return merges
        # Most frequent pair; ties broken by the pair itself so the result is deterministic.
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = tuple(out)


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Learn the BPE from the grammar and save a CLIP tokenizer folder at ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(_corpus())
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + EOW for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(out)
    return tok
