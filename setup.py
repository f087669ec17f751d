import os

from setuptools import setup

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as f:
    README = f.read()

setup(
    name="lwt",
    version="0.1.0",
    description="Fused Triton kernels for training transformer blocks layer by layer",
    long_description=README,
    long_description_content_type="text/markdown",
    packages=["lwt", "kernels"],
    python_requires=">=3.10",
    install_requires=[
        # The oldest release tested: 2.11 (the GPU image's) and 2.13 (CI's CPU build) are; older Dynamo
        # versions differ in what they can trace (torch.compile of the layers broke on 2.11 until tested).
        "torch>=2.11",
        # Kernels are written for and tested with triton 3.6 (the GPU image's version); newer releases
        # are allowed so that installing lwt never fights the triton a CUDA build of torch pins. Linux
        # only: PyPI has no triton wheel for macOS or Windows, where lwt runs the PyTorch reference (and
        # nothing imports triton unless LWT_BACKEND=triton asks for it, which then says triton is missing).
        "triton>=3.6; platform_system == 'Linux'",
        # Without a GPU the kernels run through triton's interpreter, whose 3.6 release converts
        # one-element arrays to Python ints with int(array); numpy 2.4 made that a TypeError ("only
        # 0-dimensional arrays can be converted to Python scalars"), so every CPU kernel call fails.
        "numpy<2.4",
        "einops",
        "pyyaml",
    ],
    # pytest-xdist: pytest.ini runs the suite on two worker processes (the interpreter is CPU-bound Python).
    # transformers: tests/test_examples.py runs examples/hf_llama_swap.py (4.54: set_attn_implementation;
    # capped at the major version it was tested with, 5).
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers>=4.54,<6"]},
)
