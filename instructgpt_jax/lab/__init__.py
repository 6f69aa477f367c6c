"""The embedded instruction world: a procedurally generated world, its prose, and (later) its labelers.

`lab/` judges and writes text only: it never imports `models/` or `trainers/`.
"""
