"""distmerge: training-free merging of LLM checkpoints, on one machine or across a Ray cluster."""

__version__ = "0.1.0"
