"""What the benchmark times: each provider is a loss function of (x, directions)."""

import torch
import torch._functorch.config

import sigreg_kernels
from sigreg_kernels import sigreg, sigreg_reference


def provider_names(device: str):
    """The reference, its compiled form, then every fused backend built for the device.
    (``<backend>+weights``, asked for by name, is that backend with a padding mask;
    ``<provider>+graph`` that provider's calls replayed from a CUDA graph: see ``graphed``.)"""
    fused = [b for b in sigreg_kernels.available_backends(device) if b != "reference"]
    return ["reference", "reference+compile", *fused]


GRAPH = "+graph"  # a provider's calls captured once in a CUDA graph and replayed: the GPU's time alone


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream, which also compiles);
    returns the replay. Its time has no host part: no Python, dispatch or launch cost."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"a {GRAPH!r} provider needs a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_inputs(batch, samples, dim, slices, dtype, device, seed=0):
    """``x`` in ``dtype`` (as a low-precision model emits it) and float32 unit-column directions."""
    generator = torch.Generator().manual_seed(seed)
    shape = (samples, dim) if batch == 1 else (batch, samples, dim)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    directions = torch.randn(dim, slices, generator=generator)
    return x, (directions / directions.norm(dim=0)).to(device)


def make_provider(name: str, device: str, dtype: torch.dtype, replays_backward: bool = False):
    """The loss function of provider ``name``; ``replays_backward`` if one graph's backward will run repeatedly."""
    if name == "reference":
        fn = sigreg_reference
    elif name == "reference+compile":
        # Timing the backward alone replays one graph (retain_graph=True), which
        # buffer donation forbids; donation saves memory, not time, and stays on
        # where memory is measured.
        torch._functorch.config.donated_buffer = not replays_backward
        torch._dynamo.reset()  # one compiled graph per size, never the recompile limit
        fn = torch.compile(sigreg_reference, dynamic=False)
    elif name.endswith("+weights"):  # a padding mask: 10% of the rows left out (the cost of weights)
        backend, masks = name[:-len("+weights")], {}

        def fn(x, directions):
            key = (tuple(x.shape[:-1]), x.device)
            if key not in masks:
                generator = torch.Generator().manual_seed(1)
                masks[key] = (torch.rand(key[0], generator=generator) > 0.1).to(x.device)
            return sigreg(x, directions, backend=backend, weights=masks[key])
    else:
        fn = lambda x, directions: sigreg(x, directions, backend=name)  # noqa: E731
    if dtype == torch.float32:
        return fn

    def under_autocast(x, directions):  # low-precision inputs are measured as a model under autocast sees them
        with torch.autocast(device, dtype=dtype):
            return fn(x, directions)

    return under_autocast
