"""``SIGReg``: the drop-in module, drawing fresh directions at every call."""

import weakref

import torch
import torch.distributed as dist

from .core.distributed import is_distributed
from .core.quadrature import quadrature
from .core.validation import REDUCTIONS, check_clip_value, check_quadrature_args
from .dispatch import BACKENDS
from .functional import sigreg

# Buffers of the published library's EppsPulley (``univariate_test.<name>`` in a
# SlicingUnivariateTest's state dict): knots, target CF, weights, float32.
QUADRATURE_BUFFERS = ("t", "phi", "weights")


def sample_directions(step: int, dim: int, num_slices: int, device, generator=None) -> torch.Tensor:
    """Unit-norm columns ``[dim, num_slices]`` drawn from a generator seeded with ``step``.

    The same draw as the published LeJEPA library for a given step and device,
    so swapping the module changes no number. ``generator`` (on ``device``) is
    reseeded and reused instead of creating one.
    """
    if generator is None:
        generator = torch.Generator(device=device)
    generator.manual_seed(step)
    directions = torch.randn(dim, num_slices, device=device, generator=generator)
    return directions / directions.norm(p=2, dim=0)


def published_quadrature(knots: int, t_max: float, device=None):
    """The published EppsPulley's buffers ``t``, ``phi``, ``weights`` (float32) for these knots."""
    t, phi, w = quadrature(knots, t_max, dtype=torch.float32, device=device)
    return {"t": t, "phi": phi, "weights": w}


def check_loaded_quadrature(tensors: dict, knots: int, t_max: float, owner: str) -> None:
    """Loaded ``t``/``phi``/``weights`` must be this module's quadrature: it computes with its own."""
    expected = published_quadrature(knots, t_max)
    for name, value in tensors.items():
        want = expected[name]
        if (not isinstance(value, torch.Tensor) or value.shape != want.shape
                or not torch.allclose(value.detach().float().cpu(), want, rtol=1e-5, atol=1e-7)):
            raise ValueError(
                f"{owner}: the loaded quadrature buffer {name!r} is not that of knots={knots}, "
                f"t_max={t_max} (got {tuple(getattr(value, 'shape', ()))}); construct the module with "
                "the knots (n_points) and t_max of the saved one"
            )


def _version(tensor: torch.Tensor):
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: no version counter
        return None


class StepCounter(torch.nn.Module):
    """A step counter buffer (saved in ``state_dict``) with a host-side mirror.

    Each call draws its directions from the step as a Python integer, so the
    forward reads nothing back from the device. The buffer advances with it (an
    asynchronous ``add_`` on the buffer's device). The buffer is read again only
    when something else wrote it: ``load_state_dict``, an in-place write such as
    ``fill_``, ``.to(device)`` — detected through the tensor's identity and version
    counter. Under ``torch.distributed`` the step is set to the maximum over
    ranks on the first call and after ``load_state_dict`` (one all-reduce); the
    ranks then advance in lockstep.
    """

    STEP_BUFFER = "step"
    STEP_ALIASES = ("global_step",)  # the step buffer's name in the published SlicingUnivariateTest

    def __init__(self):
        super().__init__()
        self.register_buffer(self.STEP_BUFFER, torch.zeros((), dtype=torch.long))
        self._host_step = None  # the buffer's value, or None before the first read
        self._seen = (None, None)  # (weakref to the buffer, its version) after the last read or write
        self._step_synchronized = False
        self._generators = {}  # one generator per device, reseeded per call

    def _step_buffer(self) -> torch.Tensor:
        return self._buffers[self.STEP_BUFFER]

    def _read_step(self, buffer: torch.Tensor) -> int:
        """The buffer's value (a host read), first set to the max over ranks if not synchronized yet."""
        if is_distributed() and not self._step_synchronized:
            step = buffer.detach().clone()
            if dist.get_backend() == "nccl":
                step = step.cuda()
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            buffer.copy_(step)
        self._step_synchronized = True
        return int(buffer.item())

    def next_step(self) -> int:
        """This call's step; advances the buffer and its mirror by one."""
        buffer = self._step_buffer()
        seen_buffer, seen_version = self._seen
        version = _version(buffer)
        with torch.no_grad():
            if (self._host_step is None or version is None or seen_buffer is None
                    or seen_buffer() is not buffer or seen_version != version):
                self._host_step = self._read_step(buffer)
            step = self._host_step
            buffer.add_(1)
        self._host_step = step + 1
        self._seen = (weakref.ref(buffer), _version(buffer))
        return step

    @torch.compiler.disable  # host-side state: torch.compile would guard on (and recompile for) every step
    def next_directions(self, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        """This call's directions for ``x``; advances the step."""
        return self.draw_directions(self.next_step(), x, num_slices)

    def draw_directions(self, step: int, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        """The published draw for ``x``'s width and device: float32, or float64 (exactly cast) for float64 ``x``."""
        generator = self._generators.get(x.device)
        if generator is None:
            generator = self._generators[x.device] = torch.Generator(device=x.device)
        directions = sample_directions(step, x.shape[-1], num_slices, x.device, generator=generator)
        return directions.double() if x.dtype == torch.float64 else directions

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = prefix + self.STEP_BUFFER
        if own not in state_dict:  # a state dict of the other class (SIGReg <-> SlicingUnivariateTest)
            for alias in self.STEP_ALIASES:
                if prefix + alias in state_dict:
                    state_dict[own] = state_dict.pop(prefix + alias)
                    break
        if own in state_dict and isinstance(state_dict[own], torch.Tensor) and state_dict[own].numel() == 1:
            state_dict[own] = state_dict[own].reshape(()).to(torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._step_synchronized = False  # a resumed rank may hold another step
        self._host_step = None

    def __getstate__(self):  # pickling, deepcopy: no weakref or generator; the copy reads its buffer
        state = self.__dict__.copy()
        state["_seen"], state["_generators"], state["_host_step"] = (None, None), {}, None
        return state


class SIGReg(StepCounter):
    """Sketched isotropic Gaussian regularizer with the Epps-Pulley test.

    ``forward(x: [*B, N, D])`` draws ``num_slices`` directions for this step and
    returns :func:`sigreg_kernels.sigreg` of ``x`` along them. The step counter
    ``step`` is a buffer (saved in ``state_dict``) that starts at 0 and advances
    by one per call, mirrored on the host so that a call makes no host-device
    synchronization (see :class:`StepCounter`); under ``torch.distributed`` it is
    synchronized to the maximum over ranks on the first call (ranks then advance
    in lockstep), so every rank draws the same directions. Per-slice statistics
    below ``clip_value`` count as 0 and pass no gradient. ``unbiased=True``: the
    U-statistic (see :func:`sigreg_kernels.sigreg`), for small batches.

    It loads the state dict of a ``SlicingUnivariateTest`` (``global_step``, and
    its Epps-Pulley quadrature if it matches ``knots`` and ``t_max``), and vice versa.
    The LeJEPA paper's Algorithm 1 (``[-5, 5]``, 17 trapezoid points) is exactly
    ``knots=9, t_max=5.0``.
    """

    unbiased = False  # (the default of modules pickled before the option existed)

    def __init__(self, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0,
                 reduction: str = "mean", backend: str = "auto", clip_value: float | None = None,
                 unbiased: bool = False):
        super().__init__()
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
            raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
        check_quadrature_args(knots, t_max)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        check_clip_value(clip_value)
        if not isinstance(unbiased, bool):
            raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
        self.num_slices, self.knots, self.t_max = num_slices, knots, float(t_max)
        self.reduction, self.backend, self.clip_value, self.unbiased = reduction, backend, clip_value, unbiased

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights``: sample weights ``[*B, N]`` or a bool mask (see :func:`sigreg`)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (*B, N, D), got {getattr(x, 'shape', type(x))}")
        directions = self.next_directions(x, self.num_slices)
        return sigreg(x, directions, knots=self.knots, t_max=self.t_max, reduction=self.reduction,
                      clip_value=self.clip_value, backend=self.backend, weights=weights, unbiased=self.unbiased)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A SlicingUnivariateTest's Epps-Pulley buffers: checked against ours, then consumed.
        loaded = {name: state_dict.pop(prefix + "univariate_test." + name) for name in QUADRATURE_BUFFERS
                  if prefix + "univariate_test." + name in state_dict}
        check_loaded_quadrature(loaded, self.knots, self.t_max, type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        clip = f", clip_value={self.clip_value}" if self.clip_value is not None else ""
        unbiased = ", unbiased=True" if self.unbiased else ""
        return (f"num_slices={self.num_slices}, knots={self.knots}, t_max={self.t_max}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}{clip}{unbiased}")
