"""`mtp-mcp bench`: this engine against transformers on shipped workloads, the cost of
verification against plain decoding (`--verify-cost`), and `gpu.sh` for CUDA machines. See BENCHMARKS.md."""
