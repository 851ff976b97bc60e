"""How fast could an ONNX decode step be? Each folder's weight matmuls run alone, beside its whole
decode step, in one run.

    python tools/bench_onnx_floor.py OURS_FOLDER BUILDER_FOLDER          # e.g. bench_anchors' artifacts
    python tools/bench_onnx_floor.py /tmp/bench_anchors/ours-onnx-gemma3-1b-int4-b32/* \\
        /tmp/bench_anchors/builder-gemma3-1b-int4-b32 --threads 2 --repeats 5

For every ONNX folder (ours or onnxruntime-genai's builder: the decoder named in its
genai_config.json):

  step      one decode step in onnxruntime-genai after a 128-token prompt (--steps greedy tokens
            timed, median of --repeats), in ms and tok/s: what bench_anchors' dec@128 measures
  weights   the same model's weight-reading nodes alone: every MatMulNBits, GatherBlockQuantized,
            Gather and MatMul whose weight operands are all initializers (a gather whose scales
            are reshaped at run time, as both graphs' embedding lookups are, is left out: it reads
            one row), copied into a graph of their own,
            each fed a one-token input of its width, run by an onnxruntime session with the same
            threads (median of --runs): the time a step spends in the weights' kernels when nothing
            else runs. The initializers are the folder's own (external data, not copied).
  rest      step - weights: everything else (norms, attention, rotary, casts, dispatch)

and, with two or more folders, how fast the first could decode if everything but its weight
kernels cost nothing, as a ratio to each other folder's measured step (the ceiling on "ours vs
the builder" at this position with these kernels). Not run in CI; docs/decode.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

WEIGHT_OPS = ("MatMulNBits", "GatherBlockQuantized", "Gather", "MatMul")


def decoder_path(folder: Path) -> Path:
    config = json.loads((folder / "genai_config.json").read_text())
    return folder / config["model"]["decoder"]["filename"]


def weights_graph(model_path: Path, out: Path) -> tuple[int, dict]:
    """Writes to `out` (beside model_path, so external data paths stay valid) a graph of the
    model's weight-reading nodes alone; returns (node count, {input name: (shape, dtype)})."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}
    nodes, inputs, outputs, used, feeds = [], [], [], {}, {}
    for i, node in enumerate(graph.node):
        if node.op_type not in WEIGHT_OPS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            data_inputs, k = node.input[:1], attrs["K"]
        elif node.op_type == "GatherBlockQuantized":
            data_inputs, k = node.input[1:2], None
        elif node.op_type == "Gather":
            if node.input[0] not in inits:
                continue
            data_inputs, k = node.input[1:2], None
        else:  # MatMul with a constant right-hand side (an f32 weight)
            if node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
                continue
            data_inputs, k = node.input[:1], inits[node.input[1]].dims[0]
        rest = [x for x in node.input if x and x not in data_inputs]
        if any(x not in inits and x not in consts for x in rest):
            continue  # a weight computed at run time: not a plain weight read
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        del new.output[:]
        for x in node.input:
            if x in data_inputs:
                name = f"in{i}"
                if k is None:
                    inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, [1, 1]))
                    feeds[name] = ((1, 1), np.int64)
                else:
                    inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, k]))
                    feeds[name] = ((1, 1, k), np.float32)
                new.input.append(name)
            else:
                new.input.append(x)
                if x in consts:
                    used.setdefault(x, consts[x])
                elif x:
                    used.setdefault(x, inits[x])
        new.output.append(f"out{i}")
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None))
        nodes.append(new)
    const_nodes = [v for v in used.values() if isinstance(v, onnx.NodeProto)]
    tensors = [v for v in used.values() if isinstance(v, onnx.TensorProto)]
    g = helper.make_graph(const_nodes + nodes, "weights", inputs, outputs, tensors)
    m = helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.save(m, str(out))
    return len(nodes), feeds


def time_weights(path: Path, feeds: dict, threads: int, runs: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    data = {n: (rng.integers(3, 1000, shape) if dt == np.int64 else rng.standard_normal(shape)).astype(dt)
            for n, (shape, dt) in feeds.items()}
    for _ in range(5):
        sess.run(None, data)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_step(folder: Path, threads: int, steps: int, repeats: int) -> float:
    """Seconds per decode step in onnxruntime-genai after a 128-token prompt (median of repeats)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    # the whole context, as bench_anchors does: the builder's local-attention caches refuse less
    # than their window
    length = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    rates = []
    for i in range(repeats + 1):  # the first: warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([2] + [10 + j % 200 for j in range(127)], np.int32))
        gen.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        if i:
            rates.append((time.perf_counter() - t0) / steps)
        del gen
    return statistics.median(rates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="ONNX folders with genai_config.json; the first is 'ours'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=50, help="timed runs of each weights-only graph (median)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the folders this many times (best round)")
    a = ap.parse_args(argv)
    for f in a.folders:
        if not (f / "genai_config.json").exists():
            raise SystemExit(f"error: {f} has no genai_config.json: pass an ONNX folder (ours or the builder's)")
    rows = {}
    graphs = {}
    for f in a.folders:
        path = decoder_path(f)
        out = path.with_name(f".weights-only-{path.name}")
        try:
            count, feeds = weights_graph(path, out)
            graphs[f] = (out, count, feeds)
        except Exception:
            out.unlink(missing_ok=True)
            raise
    try:
        for r in range(a.rounds):
            for f in a.folders:
                out, count, feeds = graphs[f]
                w = time_weights(out, feeds, a.threads, a.runs)
                s = time_step(f, a.threads, a.steps, a.repeats)
                best = rows.get(f)
                rows[f] = {"weights": min(w, best["weights"]) if best else w,
                           "step": min(s, best["step"]) if best else s, "nodes": count}
                print(f"round {r + 1} {f}: step {s * 1e3:.2f} ms, weights alone {w * 1e3:.2f} ms", flush=True)
    finally:
        for out, _, _ in graphs.values():
            out.unlink(missing_ok=True)
    print(f"\n{a.threads} threads, decode after a 128-token prompt, best of {a.rounds} rounds\n")
    print("| folder | step ms | tok/s | weight nodes | weights alone ms | rest ms | weights share |")
    print("|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        print(f"| {f.name} | {r['step'] * 1e3:.2f} | {1 / r['step']:.1f} | {r['nodes']} | {r['weights'] * 1e3:.2f} | "
              f"{(r['step'] - r['weights']) * 1e3:.2f} | {r['weights'] / r['step']:.0%} |")
    first = a.folders[0]
    for other in a.folders[1:]:
        print(f"\n{first.name}, everything but its weight kernels free: {1 / rows[first]['weights']:.1f} tok/s, "
              f"{rows[other]['step'] / rows[first]['weights']:.2f}x {other.name}'s measured step "
              f"(measured now: {rows[other]['step'] / rows[first]['step']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
