"""Optional analysis: quality metrics and benchmarks (may import torch; never imported by the runtime)."""
