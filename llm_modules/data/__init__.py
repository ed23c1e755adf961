"""Data: record sources (files, generators, hub datasets), rendering with prompt templates, the
train/validation split, tokenization and collation, and answer extraction for scoring."""
