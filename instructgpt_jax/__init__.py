"""instructgpt_jax: the InstructGPT pipeline (Ouyang et al. 2022) in JAX/Flax."""

from instructgpt_jax.version import __version__

__all__ = ["__version__"]
