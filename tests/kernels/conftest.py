"""Kernel tests: Triton runs compiled on a usable CUDA GPU, else in its CPU interpreter (TRITON_INTERPRET=1).

Triton reads TRITON_INTERPRET when it is first imported (its language functions are decorated for the interpreter
or the compiler then); blitzdiff imports it on the first "triton" call and torch.compile may import it too. pytest
imports this file while collecting tests/kernels, before any of its test modules, so setting it here comes first.
On a GPU the variable is left as it is (unset: the compiled kernels run). Tests read the mode through
blitzdiff.kernels._backends.triton_interpreted().
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
