"""The GPU execution path of the native decoder: CUDA-graph replay (`graphs`), the fused one-token
layer and block kernels in Triton (`fused`, `fused_kernels`), the one-row product kernel (`gemv`),
and the two ways a fixed-shape call runs (`capture`).

It builds on `models.decoder` through the decoder's static seam (see that module's doc:
`Decoder.forward_static`, `static_prologue` / `call_layer` / `static_epilogue`, and the hooks
`Decoder.row_layer`, `Attention.block_kernel`, `MLP.block_kernel` that `fused` installs); the
decoder imports nothing from here. Everything runs on the CPU too, without capture (and the
kernels under Triton's interpreter), which is how the tests check it without a GPU.

Example (needs a CUDA device):
    >>> from semiar.models.cuda import GraphedDecoder                        # doctest: +SKIP
    >>> g = GraphedDecoder(model.decoder, capacity=2048, sizes=(1, 16, 64))  # doctest: +SKIP
"""

from .graphs import GraphedDecoder

__all__ = ["GraphedDecoder"]
