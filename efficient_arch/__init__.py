"""efficient_arch: efficient LM architectures in JAX/Flax NNX, one train step, honest FLOP accounting."""

__version__ = "0.1.0"
