"""Run from the repository root: python -m mtp_mcp.benchmarks.kernels [--threads 2] [--model FILE.gguf]

Why the engine computes quantized weights with kernels of its own (engine/native/), measured: one linear layer of
the model (the first layer's gate projection, and the output layer) at 1, 5, 17 and 256 rows, as
- torch's float32 F.linear on the dequantized weight (what a float model reads);
- torch's weight-only kernels on the same shape: `_weight_int8pack_mm` (int8, a scale per row) and
  `_weight_int4pack_mm_for_cpu` (int4, groups of 32), the CPU kernels torch has for quantized weights;
- the native kernels on the GGUF's own blocks, with each instruction set this CPU runs.
Medians of interleaved runs; one line per (layer, kernel) with ms per call at each row count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtp_mcp.benchmarks.report import machine_info
from mtp_mcp.engine import native_ops
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.quantized import QuantizedLinear

ROWS = (1, 5, 17, 256)


def torch_kernels(weight: torch.Tensor) -> dict:
    """name -> f(x) for torch's float32 and weight-only int8 and int4 products of `weight` [N, K]."""
    out_features, in_features = weight.shape
    scale = weight.abs().amax(1) / 127
    int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    groups = weight.view(out_features, in_features // 32, 32)
    low, high = groups.amin(2), groups.amax(2)
    step = ((high - low) / 15).clamp_min(1e-8)
    int4 = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32).view(out_features, -1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4, 1)
    # torch's int4 zero point is relative to the mid-level 8: w = (q - 8) * step + (low + 8 * step)
    scales_zeros = torch.stack([step, low + 8 * step], dim=2).transpose(0, 1).contiguous()
    return {
        "torch float32 F.linear": lambda x: F.linear(x, weight),
        "torch _weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, int8, scale),
        "torch _weight_int4pack_mm_for_cpu": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, 32, scales_zeros),
    }


def median_ms(kernel, x: torch.Tensor, trials: int) -> float:
    kernel(x)
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        kernel(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    native_ops.set_threads(torch.get_num_threads())
    quantized = load_model(args.model, device="cpu", dtype="float32", progress=False)
    info = machine_info()
    print(f"{info['processor']} ({', '.join(info['cpu_simd'])}), {torch.get_num_threads()} thread(s), torch "
          f"{info['torch']}; ms per call at {', '.join(map(str, ROWS))} rows")
    layers = {"layer 0 gate": quantized.model.get_decoder().layers[0].mlp.gate_proj,
              "output layer": quantized.model.get_output_embeddings()}
    for layer_name, layer in layers.items():
        if not isinstance(layer, QuantizedLinear):
            raise SystemExit(f"{layer_name} is not quantized: pass a GGUF with quantized weights")
        blocks = layer.weight_blocks
        weight = native_ops.dequantized_rows(blocks, torch.arange(blocks.rows))
        kernels = torch_kernels(weight)
        for name in native_ops.instruction_sets():
            def native(x, name=name):
                native_ops.use_instruction_set(name)
                return native_ops.products(x, [blocks])
            kernels[f"native {blocks.type_name} ({name})"] = native
        inputs = {n: torch.randn(n, blocks.columns) for n in ROWS}
        times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in ROWS} for name in kernels}
        for _ in range(3):  # interleaved rounds, so every kernel sees the same machine
            for name, kernel in kernels.items():
                for n in ROWS:
                    if blocks.rows > 100_000 and ("scalar" in name or (n == 256 and "pack" in name)):
                        continue  # 25-40 s a call: the scalar fallback, and torch's weight-only kernels at 256 rows
                    trials = max(1, args.trials // (1 + n // 64) // (1 + blocks.rows // 100_000))
                    times[name][n].append(median_ms(kernel, inputs[n], trials))
        native_ops.use_instruction_set(native_ops.instruction_sets()[-1])
        print(f"{layer_name}: {blocks.rows} x {blocks.columns}, {blocks.type_name}")
        for name, by_rows in times.items():
            cells = "  ".join(f"{statistics.median(v):9.3f}" if v else f"{'-':>9}" for v in by_rows.values())
            print(f"  {name:<38} {cells}")


if __name__ == "__main__":
    main()
