"""Composers (``studio.composers``): combine several adapters at sampling time.

The protocol and the naive weighted sum are in :mod:`.base`; each method is a module:
``clora`` (CLoRA), ``lora_composer`` (LoRA-Composer), ``gated`` (AutoLoRA-style gates),
``orthogonal`` (DO-Merging; merges into one adapter), ``klora`` (K-LoRA: a subject and a style adapter, one of
the two per layer and step). ``METHODS`` lists them by the name ``studio generate --compose`` takes.
"""

from __future__ import annotations

import importlib

from studio.composers.base import Composer, Concept, compose, composing, parse_place, parse_region, parse_timesteps

METHODS = {
    "naive": "studio.composers.base:Composer",
    "clora": "studio.composers.clora:CLoRA",
    "lora-composer": "studio.composers.lora_composer:LoRAComposer",
    "gated": "studio.composers.gated:Gated",
    "orthogonal": "studio.composers.orthogonal:Orthogonal",
    "klora": "studio.composers.klora:KLoRA",
}


def get_composer(method, **options) -> Composer:
    """A composer by name (see ``METHODS``) with its options, or ``method`` itself if it is one."""
    if isinstance(method, Composer):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown composer {method!r}; choose one of {', '.join(METHODS)}")
    module, _, cls = METHODS[method].partition(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["METHODS", "Composer", "Concept", "compose", "composing", "get_composer", "parse_place", "parse_region", "parse_timesteps"]
