"""The two ways the GPU room runs a fixed-shape function over static buffers: recorded once as a
CUDA graph and replayed (`Captured`), or called directly with the same buffers (`Direct`, what the
CPU tests and the uncaptured fallback use). Both have `inputs` and `replay()`, so a caller builds
its buffers once, writes into them, and replays without knowing which it holds.

Example:
    >>> import torch
    >>> from semiar.models.cuda.capture import Direct
    >>> x = torch.zeros(3)
    >>> step = Direct(lambda t: t + 1, [x])
    >>> x.fill_(2.0); step.replay().tolist()
    tensor([2., 2., 2.])
    [3.0, 3.0, 3.0]
"""

from __future__ import annotations

import torch


class Direct:
    """The same static-shape call without a graph (CPU: tests and the fallback's logic); `warm`
    runs it once at once, as a capture's warm-up does (compilation then happens here too)."""

    def __init__(self, fn, inputs: list[torch.Tensor], warm: bool = False):
        self.fn, self.inputs = fn, inputs
        if warm:
            fn(*inputs)

    def replay(self):
        return self.fn(*self.inputs)


class Captured:
    """One CUDA graph of `fn` over static input buffers; outputs live in the graph's memory (a pool
    shared with other graphs when `pool` is given: they must not run at the same time)."""

    def __init__(self, fn, inputs: list[torch.Tensor], warmup: int = 2, pool=None):
        self.inputs = inputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compilation) outside the capture
            for _ in range(warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*inputs)

    def replay(self):
        self.graph.replay()
        return self.outputs
