"""The GPU backends inside a CUDA graph: forward and backward captured once, replayed on new data.

A graph replays the launches without the host, which is what makes the fused op cheap
at the sizes where its host cost dominates (``torch.compile(mode="reduce-overhead")``
captures graphs the same way). For that the op must launch only on the current stream,
synchronize with nothing and allocate only through torch: each replay must then give the
eager op's numbers on the data copied into the captured input. Skips without a GPU.
"""

import pytest
import torch
from helpers import assert_relative_close, random_case

from sigreg_kernels import available_backends, sigreg

BACKENDS = ("cuda", "triton")


def _needs(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backends = available_backends("cuda", torch.bfloat16)
    if backend not in backends:
        pytest.skip(f"{backend}: {backends.unavailable.get(backend, 'unavailable')}")


def forward_backward(x, directions, backend, weights):
    loss = sigreg(x, directions, backend=backend, weights=weights)
    loss.backward()
    return loss


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_forward_backward_replays_the_eager_numbers(backend, dtype, weighted):
    _needs(backend)
    inputs = [random_case((2,), 300, 64, 96, dtype=dtype, device="cuda", seed=seed) for seed in range(3)]
    directions = inputs[0][1]
    weights = (torch.rand(2, 300, device="cuda") > 0.3).float() if weighted else None
    static_x = inputs[0][0].clone().requires_grad_()

    side = torch.cuda.Stream()  # warm up (compiles Triton's kernels) off the capture, as torch advises
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_x.grad = None
            forward_backward(static_x, directions, backend, weights)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = forward_backward(static_x, directions, backend, weights)

    for x, _ in inputs[1:]:
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        eager_x = x.clone().requires_grad_()
        eager_loss = forward_backward(eager_x, directions, backend, weights)
        torch.cuda.synchronize()
        # The same kernels on the same data; only cuBLAS may pick another algorithm under capture.
        assert_relative_close("loss", static_loss, eager_loss, 1e-5)
        assert_relative_close("grad", static_x.grad, eager_x.grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_with_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead"): Inductor runs the op, forward and backward, in its
    CUDA graphs; values and gradients as eager, call after call on new data."""
    _needs(backend)
    torch._dynamo.reset()
    compiled = torch.compile(lambda u, a: sigreg(u, a, backend=backend), mode="reduce-overhead", fullgraph=True)
    directions = random_case((2,), 300, 64, 96, dtype=torch.bfloat16, device="cuda")[1]
    for seed in range(4):
        x = random_case((2,), 300, 64, 96, dtype=torch.bfloat16, device="cuda", seed=seed)[0]
        ours, eager = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = compiled(ours, directions)
        loss.backward()
        loss = loss.detach().clone()  # a graph's output is overwritten by its next replay
        eager_loss = sigreg(eager, directions, backend=backend)
        eager_loss.backward()
        assert_relative_close("loss", loss, eager_loss, 1e-3)
        assert_relative_close("grad", ours.grad, eager.grad, 2e-2)
