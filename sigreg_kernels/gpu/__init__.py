"""The GPU backends: the kernels' contract (``contract.py``, plain PyTorch), the autograd that
strings the kernels together with library GEMMs (``gpu/fused.py``), and one folder per backend:
``cuda/`` (the CUDA C++ kernels of ``csrc/cuda/``) and ``triton/``."""
