"""Adapters: one in-memory form (:mod:`.form`), key layouts (:mod:`.keys`), files (:mod:`.files`)."""

from studio.adapters.files import LAYOUTS, SAVE_DTYPES, load_adapter, save_adapter, to_state_dict
from studio.adapters.form import Adapter, AdapterMeta, LoraWeights

__all__ = ["LAYOUTS", "SAVE_DTYPES", "Adapter", "AdapterMeta", "LoraWeights", "load_adapter", "save_adapter", "to_state_dict"]
