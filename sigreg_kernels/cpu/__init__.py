"""The CPU backend: the C++ op ``sigreg::ecf_sums`` (``csrc/cpu/``), its fake kernel and autograd."""
