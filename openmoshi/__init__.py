"""openmoshi: a plain PyTorch re-implementation of Kyutai's Moshi and its Mimi codec."""

__version__ = "0.1.0"
