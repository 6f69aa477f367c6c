"""Data: tokenizers, text corpora and batching (formats and TFDS builders come with the data issue)."""
