"""Counting the device ops a call dispatches: what a GPU would launch.

Views, metadata and allocations (``empty``) launch nothing and are not counted;
every other aten op, and every op of this library, counts once. An op of this
library counts as one kernel only if it dispatches no other counted op inside:
``OpCounter`` looks inside each with a second counter and records what it saw.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
            "_unsafe_view"}  # a view without an alias annotation


def launches_nothing(func) -> bool:
    schema = func._schema
    name = schema.name.split("::")[-1]
    if name in FREE_OPS:
        return True
    returns = schema.returns
    # A view returns an alias of an input and moves no data.
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _device_keys(args, kwargs):
    """The dispatch key of the device the op's first tensor argument is on."""
    tensor = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    key = torch._C.DispatchKey.CUDA if tensor.device.type == "cuda" else torch._C.DispatchKey.CPU
    return torch._C.DispatchKeySet(key)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.inside = {}  # library op -> Counter of the device ops it dispatched itself

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if launches_nothing(func):
            return func(*args, **kwargs)
        name = func._schema.name
        self.ops[name] += 1
        if name.startswith("sigreg::"):
            # Straight to the op's device kernel (calling func again would come back here),
            # with a second counter for what that kernel dispatches.
            with OpCounter() as inner:
                out = func.redispatch(_device_keys(args, kwargs), *args, **kwargs)
            self.inside.setdefault(name, Counter()).update(inner.ops)
            return out
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())
