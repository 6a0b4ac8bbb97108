"""Helpers shared by tests: tiny HF models and tokenizers created on the spot (no network)."""
