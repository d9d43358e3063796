"""Benchmarks of DESIGN §4's workloads (`grinfer bench`)."""
