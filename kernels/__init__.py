"""Kernels (``studio.kernels``): pure functions over tensors, each with a torch reference and faster paths
tested against it; nothing outside knows which path ran.

- :mod:`.lora`: ``multi_lora_linear`` (base layer plus every adapter in two GEMMs, gates in rank space, or
  each adapter on its own tokens where region gates are sparse; Triton shrink/expand kernels on CUDA), with
  ``multi_lora_reference`` (the loop), ``Packed`` and ``TokenGates``;
- :mod:`.attention`: ``region_attention`` with ``RegionMask`` label tables (LoRA-Composer's regional
  cross-attention and isolated self-attention in one call per layer: FlexAttention block masks on CUDA,
  SDPA otherwise, xformers for unmasked attention when installed).
"""

import sys as _sys

if __name__ == "kernels":
    # This folder is ``studio.kernels``. Imported as a top-level ``kernels`` it would shadow Hugging Face's ``kernels``
    # package, which transformers (>= 5.25 requires it) imports: that happens whenever this checkout's root is on
    # sys.path, as with ``python -m pytest`` or ``accelerate launch -m ...`` run from it. Load the real package in
    # its place: an import returns the module that sys.modules holds once this file has run.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ folder is studio.kernels)",
                                  name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
