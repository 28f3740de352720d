"""The ``triton`` backend: the ``@triton.jit`` kernels (``kernels.py``), their launch plan
(``plan.py``) and the registered ops that launch them (``ops.py``)."""
