"""repro: the wav2vec family of speech papers, reproduced in plain PyTorch."""

__version__ = "0.1.0"
