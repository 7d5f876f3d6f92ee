"""Triton kernels, one module per op family. Installed as ``fastpeft.triton_kernels``.

Import the op modules (``fastpeft.triton_kernels.lora``) only where triton is available: importing them
imports triton.
"""
