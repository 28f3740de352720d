"""Shared pieces of every backend and of the public API: the quadrature, the numerics, the
argument checks and torch.distributed. They import nothing of the package but each other."""
