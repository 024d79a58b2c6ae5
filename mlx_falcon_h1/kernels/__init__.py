"""Mamba2 building blocks of Falcon-H1.

One module per op. Each holds the pure-MLX reference implementation, which runs
on every MLX backend and is the oracle the custom kernels are tested against.
"""
