"""Run from the repository root: OMP_NUM_THREADS=1 python -m mtp_mcp.benchmarks.hybrid_rollback_cost [--shape 0.8b]

What a verification step costs on a hybrid (Qwen3.5) target, by how many of 4 drafts were accepted, for two exact
rollbacks of the recurrent state:
- per-position states (engine.target as shipped): the cache records the state after each verified position (the
  one-token kernel runs those positions) and a rejection is one crop;
- snapshot + restore + re-run (what the engine did before transformers 5.25 could record them): the state from
  before the chunked verify pass is kept, and a rejection restores it and feeds the accepted tokens again.
Both are checked to leave the same states. --shape tiny is tests/mtp_checkpoints.py's model (3 linear + 1 attention
layer); --shape 0.8b has Qwen3.5-0.8B's layer shapes (random weights, a small vocabulary). Importing this module does
nothing: the set-up (tests/ on sys.path, one thread) happens in main()."""
import argparse
import pathlib
import random
import statistics
import sys
import tempfile
import time

import torch

FED = [50, 51, 52, 53, 54]  # the last committed token + 4 drafts
PREFIX = list(range(3, 43))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("tiny", "0.8b"), default="tiny")
    parser.add_argument("--reps", type=int, default=None, help="interleaved runs per case (tiny 200, 0.8b 20)")
    args = parser.parse_args()
    sys.path.insert(0, "tests")  # run from the repository root
    torch.set_num_threads(1)
    from mtp_checkpoints import cache_states
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    from mtp_mcp.engine.target import TargetModel

    model = _model(args.shape)
    reps = args.reps or (200 if args.shape == "tiny" else 20)

    def fresh() -> TargetModel:
        target = TargetModel(model)
        target.prefill(PREFIX)
        return target

    def per_position(accepted):
        target = fresh()
        return target, lambda: (target.forward(FED, logits_for_last=0), target.rollback(len(FED) - 1 - accepted))

    def snapshot_rerun(accepted):
        target = fresh()
        linear = [layer for layer in target.cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]

        @torch.inference_mode()
        def step():
            # With none to keep, the chunked kernel runs every position and the cache keeps one state: the one from
            # before the forward, the snapshot. Repeated n times, a crop of n tokens takes it back.
            target.cache.activate_past_recording(recurrent_states_to_keep=0)
            target._feed(FED)
            if accepted < len(FED) - 1:
                for layer in linear:
                    layer.recurrent_states_history[0] = layer.recurrent_states_history[0] * len(FED)
                target.cache.crop(-len(FED))
                del target.ids[-len(FED):]
                target._feed(FED[: accepted + 1])
            target.cache.crop(0)
        return target, step

    def verify_only(accepted):
        target = fresh()
        return target, lambda: target.forward(FED, logits_for_last=0)

    for accepted in range(len(FED)):
        (a, step_a), (b, step_b) = per_position(accepted), snapshot_rerun(accepted)
        step_a(), step_b()
        for x, y in zip(cache_states(a.cache), cache_states(b.cache)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)

    kinds = {"per-position": per_position, "snapshot": snapshot_rerun, "verify only": verify_only}
    results = {(kind, accepted): [] for kind in kinds for accepted in range(len(FED))}
    for _ in range(reps):
        order = list(results)
        random.shuffle(order)
        for kind, accepted in order:
            _, step = kinds[kind](accepted)
            started = time.perf_counter()
            step()
            results[(kind, accepted)].append(time.perf_counter() - started)
    print(f"shape {args.shape}, 1 thread, {len(PREFIX)}-token prefix, medians of {reps} interleaved runs (ms)")
    print("accepted of 4 | per-position states + crop | snapshot + restore + re-run | verify pass alone (per-position)")
    for accepted in range(len(FED)):
        medians = [statistics.median(results[(kind, accepted)]) * 1e3 for kind in kinds]
        print(f"{accepted} | " + " | ".join(f"{m:.2f}" for m in medians))


def _model(shape: str):
    from mtp_checkpoints import build_qwen3_5

    from mtp_mcp.engine.loading import load_model

    if shape == "tiny":
        return load_model(str(build_qwen3_5(pathlib.Path(tempfile.mkdtemp()) / "q")), "cpu", "float32",
                          progress=False).model
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    # Qwen3.5-0.8B's published text config, with a vocabulary of 1,000 (the output layer is not what is measured).
    config = Qwen3_5TextConfig(
        vocab_size=1000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 6,
    )
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval()


if __name__ == "__main__":
    main()
