import random

import pytest
from transformers import CLIPTokenizer

from studio.families import EMBEDDED_MODEL
from studio.world.grammar import VOCABULARY, sample_captioned_scene
from studio.world.tokenizer import build_tokenizer, corpus_words


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))  # the stock class reads what we wrote


def test_every_grammar_word_is_one_token(tokenizer):
    for word in corpus_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
    # the rest of the grammar's words (the held-out style names after the first) tokenize into pieces, none unknown
    for word in set(VOCABULARY) - set(corpus_words()):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids)
        assert len(tokens) > 1 and "".join(tokens).replace("</w>", "") == word, (word, tokens)


def test_grammar_round_trips(tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        _, caption = sample_captioned_scene(rng)
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
        decoded = tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",")
        assert decoded == caption


def test_unknown_words_tokenize_into_pieces(tokenizer):
    for word in ("sks", "zwx", "ohwx", "qq7"):
        ids = tokenizer(f"a {word} star", add_special_tokens=False).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.unk_token_id not in ids
        assert tokens[0] == "a</w>" and tokens[-1] == "star</w>"
        assert "".join(tokens[1:-1]).replace("</w>", "") == word
    # padding to the length the pipelines use
    assert tokenizer("a red circle", padding="max_length", max_length=77).input_ids.__len__() == 77


def test_embedded_model_ships_the_same_tokenizer(tokenizer):
    shipped = CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL / "tokenizer"))
    assert shipped.get_vocab() == tokenizer.get_vocab()
