"""dd_jax: DiffDecompose (layer-wise decomposition of alpha-composited images) in JAX/Flax."""

__version__ = "0.1.0"
