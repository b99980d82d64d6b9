"""xvalid: validate a C++/CUDA transformer forward pass against a PyTorch reference."""

__version__ = "0.1.0"
