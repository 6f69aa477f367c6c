"""The embedded instruction world: a procedurally generated world, its prose, and (later) its labelers.

`lab/` judges and writes text only: it never imports `models/` or a stage (`stages/`); it registers its data
scheme (`lab:...`) with data/schemes.py.
"""
