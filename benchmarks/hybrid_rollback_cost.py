"""Run from the repository root: OMP_NUM_THREADS=1 python benchmarks/hybrid_rollback_cost.py

Which hybrid rollback is cheaper on the tiny Qwen3.5: snapshot + restore + re-run (engine.target) vs per-position
recurrent states (a recording recurrent kernel patched in for this measurement only). Importing this module does
nothing: the set-up (tests/ on sys.path, one thread, the patched kernel) happens in main()."""
import pathlib
import random
import statistics
import sys
import tempfile
import time

import torch


def main() -> None:
    sys.path.insert(0, "tests")  # run from the repository root
    torch.set_num_threads(1)
    import transformers.models.qwen3_5.modeling_qwen3_5 as q35
    from mtp_checkpoints import build_qwen3_5
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    from mtp_mcp.engine.loading import load_model
    from mtp_mcp.engine.target import TargetModel

    lm = load_model(str(build_qwen3_5(pathlib.Path(tempfile.mkdtemp()) / "q")), "cpu", "float32", progress=False)
    model = lm.model
    prefix = list(range(3, 43))
    fed = [50, 51, 52, 53, 54]  # last committed token + 4 drafts
    REPS = 200

    def fresh():
        t = TargetModel(model); t.prefill(prefix); return t

    # A: engine.target as shipped.
    def a_step(accepted):
        def prepare():
            t = fresh()
            def step():
                t.forward(fed); t.rollback(len(fed) - 1 - accepted)
            return step
        return prepare

    # B: per-position states. The verify pass runs a recurrent kernel that records the state after every position.
    recorded = []
    chunked = q35.torch_chunk_gated_delta_rule
    def recording_kernel(query, key, value, g, beta, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False, **kw):
        if initial_state is None:  # prefill: unchanged
            return chunked(query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kw)
        states = []
        out = []
        state = initial_state
        for i in range(query.shape[1]):
            o, state = q35.torch_recurrent_gated_delta_rule(query[:, i:i+1], key[:, i:i+1], value[:, i:i+1], g=g[:, i:i+1], beta=beta[:, i:i+1], initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            states.append(state); out.append(o)
        recorded.append(states)
        return torch.cat(out, dim=1), state

    def b_step(accepted):
        def prepare():
            t = fresh()
            def step():
                recorded.clear()
                q35.torch_chunk_gated_delta_rule = recording_kernel
                try:
                    with torch.inference_mode():
                        t._feed(fed)
                finally:
                    q35.torch_chunk_gated_delta_rule = chunked
                rejected = len(fed) - 1 - accepted
                if rejected:
                    with torch.inference_mode():
                        t.cache.crop(-rejected)
                        linear = [l for l in t.cache.layers if isinstance(l, LinearAttentionCacheLayerMixin)]
                        for layer, states in zip(linear, recorded):
                            layer.recurrent_states[0].copy_(states[accepted])
                else:
                    with torch.inference_mode():
                        t.cache.crop(0)
            return step
        return prepare

    def states(t):
        out = []
        for l in t.cache.layers:
            if isinstance(l, LinearAttentionCacheLayerMixin): out += [l.conv_states[0][..., -4:], l.recurrent_states[0]]
            else: out += [l.keys, l.values]
        return out
    # B is exact too: same states as A after each outcome
    for accepted in (0, 2, 4):
        a = fresh(); a.forward(fed); a.rollback(len(fed) - 1 - accepted)
        step = b_step(accepted)(); step()
        tb = [c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, TargetModel)][0]
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(states(a), states(tb))), accepted

    def one(prepare):
        step = prepare(); t0 = time.perf_counter(); step(); return time.perf_counter() - t0
    kinds = {"verify only": lambda acc: (lambda: (lambda t: (lambda: t.forward(fed)))(fresh())), "A": a_step, "B": b_step}
    results = {(k, acc): [] for k in kinds for acc in range(5)}
    for rep in range(REPS):
        order = [(k, acc) for k in kinds for acc in range(5)]
        random.shuffle(order)
        for k, acc in order:
            results[(k, acc)].append(one(kinds[k](acc)))
    print("accepted of 4 | A: snapshot + restore + re-run (ms) | B: per-position states (ms) | verify pass alone, chunked kernel (ms)")
    for acc in range(5):
        med = {k: statistics.median(results[(k, acc)]) * 1e3 for k in kinds}
        print(f"{acc} | {med['A']:.2f} | {med['B']:.2f} | {med['verify only']:.2f}")


if __name__ == "__main__":
    main()
