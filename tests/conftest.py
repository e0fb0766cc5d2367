"""Suite-wide settings: one intra-op thread per test process (pytest -n 2 runs two of them on two cores;
tiny models are slower with more threads on a shared, loaded machine)."""
import torch

torch.set_num_threads(1)
