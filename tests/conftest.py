"""Shared test settings: small thread pools (the machines have 2 cores) and the `slow` marker."""
import torch

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long multi-process runs; still part of CI")
