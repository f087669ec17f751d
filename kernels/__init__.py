"""Triton kernels of lwt, one op per file, plus `reference.py`, the plain-PyTorch specification.

Nothing here imports `lwt`: the dependency runs one way, `lwt.functional` -> `kernels`.
"""
