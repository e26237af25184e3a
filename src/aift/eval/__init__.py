"""Evaluation: loss/perplexity and generation scores (`evaluate`), HTML reports (`report`), system metrics."""
