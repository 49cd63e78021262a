"""Trainers (``studio.trainers``): DreamBooth-LoRA, SingLoRA, B-LoRA, content/style and motion.

Each arrives with its issue and shares one training loop; see docs/architecture.md.
"""
