"""A stand-in for NVIDIA Transformer Engine, for CPU tests of megamoe's wiring only: the same constructor
arguments and behaviour as te.pytorch.Linear (column / row parallel over tp_group), computed in plain PyTorch.
It checks megamoe's use of TE's interface, not TE itself."""
