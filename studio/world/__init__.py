"""The synthetic world: concepts, renderer, caption grammar, tokenizer and the embedded model's recipe."""
