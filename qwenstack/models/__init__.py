"""Model architectures and their numerical kernels."""
