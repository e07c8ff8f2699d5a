"""cory: reinforcement-learning fine-tuning of language models, alone or as a coevolving pair."""

__version__ = "0.1.0"
