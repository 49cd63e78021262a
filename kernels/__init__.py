"""Kernels (``studio.kernels``): pure functions over tensors, each with a torch reference and faster paths
tested against it; nothing outside knows which path ran.

- :mod:`.lora`: ``multi_lora_linear`` (base layer plus every adapter in two GEMMs, gates in rank space, or
  each adapter on its own tokens where region gates are sparse; Triton shrink/expand kernels on CUDA), with
  ``multi_lora_reference`` (the loop), ``Packed`` and ``TokenGates``;
- :mod:`.attention`: ``region_attention`` with ``RegionMask`` label tables (LoRA-Composer's regional
  cross-attention and isolated self-attention in one call per layer: FlexAttention block masks on CUDA,
  SDPA otherwise, xformers for unmasked attention when installed).
"""
