"""Synthetic corpora the zoo's models are pretrained on; each also serves held-out prompts."""
