"""The ``cuda`` backend: the registered ops of ``csrc/cuda/`` (``ops.py``) and their launch plan
(``plan.py``, the mirror of the C++ plan)."""
