"""Pivotal tuning: the identifier becomes a token of its own, whose input embedding trains beside the LoRA.

A rare identifier such as "zxy" is no token of a CLIP vocabulary: it tokenizes into pieces ("z", "x", "y</w>") that
every other word made of them shares, so all the binding of the concept to the word falls on the LoRA. With
``--pivotal`` (diffusers' advanced DreamBooth LoRA script's ``--train_text_encoder_ti``, kohya's and A1111's bundled
embeddings) the identifier is added to each tokenizer as one new token; its embedding in each text encoder is a
parameter trained with the LoRA (``--embedding-lr``), starting from the mean of its pieces' embeddings; the encoders'
weights and the rest of the vocabulary stay as they are. One vector per encoder by default; ``--embedding-vectors N``
(diffusers' ``--num_new_tokens_per_abstraction``) gives the identifier N tokens, "zxy", "zxy_1", ..., which prompts carry
as "zxy zxy_1 ..." wherever they name "zxy" (as diffusers' pipelines write a multi-vector embedding's token,
:func:`studio.adapters.form.multi_vector`).

The embeddings are written beside the adapter file, in ``NAME_emb.safetensors`` (keys ``clip_l`` / ``clip_g``, the
token named in the header; :mod:`studio.adapters.files`), so that the LoRA file stays one that stock
``load_lora_weights`` accepts; :func:`studio.plugin.attach` adds the token and its embeddings to a pipeline's
tokenizers and text encoders with diffusers' textual inversion loader, and detaching takes them out again. Stock
diffusers loads them as::

    pipe.load_lora_weights("adapter.safetensors")
    state = safetensors.torch.load_file("adapter_emb.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="zxy", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="zxy", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
"""

from __future__ import annotations

from functools import partial

import torch

from studio.adapters.form import TEXT_ENCODERS, token_names, tokenizer_of


def _put_embedding(token_ids: list[int], vectors: torch.nn.Parameter, module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook on a token-embedding table: the rows of ``token_ids[k]`` become ``vectors[k]``."""
    for k, token_id in enumerate(token_ids):
        out = torch.where((args[0] == token_id)[..., None], vectors[k].to(out.dtype), out)
    return out


def add_token(pipe, token: str, vectors: int = 1) -> dict[str, torch.nn.Parameter]:
    """Add ``token`` (and with ``vectors`` > 1, "TOKEN_1", ...) to each tokenizer of ``pipe`` and give it a trainable
    ``(vectors, width)`` embedding in each text encoder (a hook puts the parameter in place of the table's rows), each
    vector starting at the mean of the token's former pieces' rows; returns the parameters by text encoder."""
    params = {}
    names = token_names(token, vectors)
    for component in TEXT_ENCODERS:
        encoder, tokenizer = getattr(pipe, component, None), getattr(pipe, tokenizer_of(component), None)
        if encoder is None or tokenizer is None:
            continue
        taken = [t for t in names if t in tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"--pivotal: {taken[0]!r} is already a token of the model's {tokenizer_of(component)};"
                             " pivotal tuning gives the identifier a new token, so choose a --token that is not one")
        encoder.requires_grad_(False)  # only the new token's embedding trains (not a graph through every weight)
        pieces = tokenizer(token, add_special_tokens=False).input_ids
        table = encoder.get_input_embeddings()
        start = table.weight[pieces].detach().float().mean(0, keepdim=True).repeat(vectors, 1)
        tokenizer.add_tokens(names)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = encoder.get_input_embeddings()
        param = torch.nn.Parameter(start.to(table.weight.device))
        table.register_forward_hook(partial(_put_embedding, tokenizer.convert_tokens_to_ids(names), param))
        params[component] = param
    if not params:
        raise ValueError("--pivotal trains a token embedding of the text encoders, and this pipeline has none")
    return params


def embeddings(params: dict[str, dict[str, torch.nn.Parameter]]) -> dict[str, dict[str, torch.Tensor]]:
    """The trained embeddings (``{token: {text encoder: parameter}}``) in the adapter form's layout: ``(vectors,
    width)`` tensors on the CPU."""
    return {t: {c: p.detach().float().cpu().clone() for c, p in per.items()} for t, per in params.items()}
