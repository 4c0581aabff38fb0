"""`make gpu-check`: one bounded run that checks the GPU path on a CUDA machine.

Backends against their references on a small model, one FSDP2 BF16 training step and the
1.4B model's throughput (BF16 and FP8, with and without activation checkpointing), printed
as one table. It imports only torch, numpy and pyarrow (and torchao, from a folder of
wheels copied along with the checkout), so a bare Python with a CUDA torch runs it.
"""
