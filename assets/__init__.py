"""Data shipped with the studio: the embedded model (``models/``) and the world judge (``judge/``)."""
