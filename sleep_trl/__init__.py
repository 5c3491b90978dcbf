"""sleep-trl: the Sleep paradigm for continual learning of language models, on Hugging Face TRL."""

__version__ = "0.1.0.dev0"
