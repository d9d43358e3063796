"""Plain-PyTorch definitions of every op: the twins that fast kernels are checked against."""
