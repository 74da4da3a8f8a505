"""Evaluation: token perplexity, and lm-eval (local last-word and word-perplexity tasks,
or any registered task) on an in-memory model."""
