"""lwt: fused Triton kernels for training transformer blocks layer by layer.

`lwt.functional` holds one function per op (Triton on CUDA tensors, the PyTorch reference otherwise);
`lwt.layers` the nn.Modules built on them.
"""
__version__ = "0.1.0"
