"""What the stages share: the training loop (`loop`), loading models (`model_io`), frozen judges and
policies (`judging`), the step builders (`lm_steps`, `ppo_steps`) and the compile-ahead plan (`aot`).

A library module never imports a stage (instructgpt_jax/stages/) or a command (main, sample, export, sweep);
tests/import_rules_test.py checks it.
"""
