"""The CPU execution path's own kernels: integer dot products of quantized weights with int8
activations (`qdot`, AVX512-VNNI, compiled on first use)."""
