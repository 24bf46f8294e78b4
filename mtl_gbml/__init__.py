"""mtl_gbml: multi-task learning and gradient-based meta-learning for few-shot learning in JAX."""

__version__ = "0.1.0"
