"""Metrics read by the world judge: prompt fidelity and identity similarity."""
