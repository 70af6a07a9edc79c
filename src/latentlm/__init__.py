"""latentlm: pretraining language models that think in continuous space."""

__version__ = "0.2.0"
