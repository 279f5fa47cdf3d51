"""Triton kernels of sagfast (installed as `sagfast.kernels`). Importing this package needs no Triton."""
