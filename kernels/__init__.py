"""Kernels (``studio.kernels``): multi-adapter LoRA linear and region-masked attention.

A torch reference and faster paths, tested against it, arrive with their issue; see
docs/architecture.md.
"""
