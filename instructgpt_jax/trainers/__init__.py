"""One trainer module per stage: orchestration only (the math lives in losses.py, rl.py, generation.py)."""
