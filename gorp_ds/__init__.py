"""gorp_ds: GORP continual fine-tuning of LLaMA-family models under DeepSpeed ZeRO."""

from .optim import GORP

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` that runs a ``GORP`` optimizer under ZeRO-1/2.
    See :func:`gorp_ds.zero.initialize`."""
    from .zero import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = ["GORP", "initialize", "__version__"]
