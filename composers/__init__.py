"""Composers (``studio.composers``): combine several adapters at sampling time.

CLoRA, LoRA-Composer, gated fusion, orthogonal merging and the naive weighted sum arrive with
their issue; see docs/architecture.md.
"""
