"""Data: formats.py (JSONL kinds, one-line errors), tokenizer.py, templates.py, tfds_builders.py (array_record
builds without TensorFlow), batching.py (batch layouts), pipeline.py (grain: shuffling, hosts, state),
stage_data.py (what the stage modules call), text.py (pretraining text). docs/data.md describes them."""
