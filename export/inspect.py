"""`python -m export inspect ARTIFACT [--json]`: what an exported artifact holds.

  .tflite      signatures with their inputs/outputs, state (cache) tensors and their bytes, the
               decode op histogram and composites, the stored form of each kind of weight, our
               metadata
  .litertlm    the same for its TFLite model, plus the bundle's sections, LlmMetadata (start/stop
               tokens, max_num_tokens, model type, prompt templates), ExecutorMetadata (context,
               declared state buffers) and the bundled tokenizer
  ONNX         (model.onnx or an onnxruntime-genai folder) inputs/outputs, states, op histogram,
               contrib ops, the stored form of each kind of weight, our metadata, genai_config.json
               and the tokenizer files

Nothing is loaded into a runtime and weights are not read (only their headers), so inspecting a
multi-GB artifact is quick.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from contract.layout import Naming

# the operands of ONNX ops that hold weights, by input slot
_ONNX_OPERANDS = {("MatMul", 1): "weight", ("Gemm", 1): "weight", ("Gather", 0): "table",
                  ("MatMulNBits", 1): "weight", ("MatMulNBits", 2): "scales", ("GatherBlockQuantized", 0): "table",
                  ("GatherBlockQuantized", 2): "scales", ("GroupQueryAttention", 7): "cos cache",
                  ("GroupQueryAttention", 8): "sin cache"}


def _states(metadata, naming) -> list[dict]:
    """The artifact's states, from its metadata's layout (contract/layout.py): name in the
    artifact's naming, layer, kind of layer and of state, shape (as runtimes allocate it), bytes."""
    if metadata is None:
        return []
    return [{"name": s.name(naming), "layer": s.layer, "kind": s.layer_kind.value, "state": s.kind.value,
             "shape": list(s.shape), "dtype": s.dtype.name, "bytes": s.nbytes} for s in metadata.states]


def _metadata(metadata) -> dict | None:
    return None if metadata is None else json.loads(metadata.to_json())


def _tokenizer(model_bytes: bytes | None) -> dict | None:
    if model_bytes is None:
        return None
    from contract.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(model_bytes)
    return {"pieces": tok.vocab_size, "bos": tok.bos_id, "eos": tok.eos_id,
            "start_of_turn": tok.start_of_turn_id, "end_of_turn": tok.end_of_turn_id, "bytes": len(model_bytes)}


def describe_tflite(path: Path) -> dict:
    from export.lowering.tflite.inspect import read

    report = read(path)
    body = {
        "artifact": str(path), "kind": "litertlm" if path.suffix == ".litertlm" else "tflite",
        "file_bytes": report.file_bytes,
        "signatures": {name: {"inputs": [list(t) for t in sig["inputs"]], "outputs": [list(t) for t in sig["outputs"]]}
                       for name, sig in report.signatures.items()},
        "states": _states(report.metadata, Naming.TFLITE),
        "kv_bytes_per_token": report.metadata.states.kv_bytes_per_token() if report.metadata else 0,
        "decode_ops": dict(report.op_histogram.get("decode", collections.Counter()).most_common()),
        "composites": dict(report.composites), "custom_ops": dict(report.custom_ops),
        "weights": report.weight_kinds, "metadata": _metadata(report.metadata), "tokenizer": None,
    }
    if path.suffix == ".litertlm":
        from google.protobuf import json_format

        from contract.bundle import read_bundle

        bundle = read_bundle(path)
        body["bundle"] = {
            "version": ".".join(map(str, bundle.version)), "system": bundle.system,
            "sections": [{"type": s.data_type, "bytes": s.size, **s.items} for s in bundle.sections]}
        for key, proto in (("llm_metadata", bundle.llm_metadata()), ("executor_metadata", bundle.executor_metadata())):
            body[key] = None if proto is None else json_format.MessageToDict(proto)
        body["tokenizer"] = _tokenizer(bundle.tokenizer_bytes())
    return body


def describe_onnx(path: Path) -> dict:
    import onnx

    from contract.onnx import model_file
    from export.lowering.onnx.inspect import read

    report = read(path)
    model = onnx.load(str(model_file(path)), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    type_names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    weights, seen = {}, set()
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for slot, name in enumerate(node.input):
            t = inits.get(name)
            if t is None or (name, node.op_type) in seen:
                continue
            size = (int({e.key: e.value for e in t.external_data}["length"])
                    if t.data_location == onnx.TensorProto.EXTERNAL else len(t.raw_data))
            known = (node.op_type, slot) in _ONNX_OPERANDS
            if not known and (size < 4096 or type_names[t.data_type] in ("INT64", "INT32", "BOOL")):
                continue  # shapes and other small constants are not weights
            seen.add((name, node.op_type))
            operand = _ONNX_OPERANDS.get((node.op_type, slot), f"input {slot}")
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized") and operand in ("weight", "table"):
                form = f"INT{attrs.get('bits', 4)} blockwise-{attrs.get('block_size')}"
            else:
                form = type_names[t.data_type]
            entry = weights.setdefault(f"{node.op_type} {operand}", {}).setdefault(form, [0, 0])
            entry[0] += 1
            entry[1] += size
    folder = report.path if report.path.is_dir() else report.path.parent
    tok_model = folder / "tokenizer.model"
    body = {
        "artifact": str(path), "kind": "onnx", "file_bytes": report.file_bytes,
        "inputs": [list(t) for t in report.inputs], "outputs": [list(t) for t in report.outputs],
        "states": _states(report.metadata, Naming.ONNX_PAST),
        "kv_bytes_per_token": report.metadata.states.kv_bytes_per_token() if report.metadata else 0,
        "ops": dict(report.op_histogram.most_common()), "contrib_ops": sorted(report.contrib_ops),
        "functions": sorted(report.function_ops), "weights": weights, "metadata": _metadata(report.metadata),
        "genai_config": report.genai_config,
        "tokenizer_files": sorted(p.name for p in folder.glob("tokenizer*")),
        "tokenizer": _tokenizer(tok_model.read_bytes()) if tok_model.exists() else None,
        "vision": _onnx_vision_graphs(folder),
    }
    return body


def _onnx_vision_graphs(folder: Path) -> dict:
    """{file: {inputs, outputs, bytes}} of a vision model's extra graphs (docs/vision.md)."""
    import onnx

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    out = {}
    for name in ("vision.onnx", "embedding.onnx", "image_prefill.onnx"):
        path = folder / name
        if path.exists():
            graph = onnx.load(str(path), load_external_data=False).graph
            data = path.with_name(path.name + ".data")
            out[name] = {"inputs": [[v.name, dims(v)] for v in graph.input if not v.name.startswith("past")],
                         "outputs": [[v.name, dims(v)] for v in graph.output if not v.name.startswith("present")],
                         "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0)}
    return out


def describe(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    if path.suffix in (".tflite", ".litertlm"):
        return describe_tflite(path)
    if path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        return describe_onnx(path)
    raise ValueError(f"{path}: unknown artifact type (supported: .tflite, .litertlm, .onnx, an "
                     "onnxruntime-genai folder)")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


# quant_method values that name a transform of the weights, not how the codes were chosen
FOLDS = ("smoothed", "rotated")


def method_text(method: str | None) -> str:
    """A quant_method as a reader wants it: "gptq+rotated" -> "gptq codes, rotated" (the codes'
    method, then the transforms joined by +)."""
    parts = method.split("+") if method else []
    folds = [m for m in parts if m in FOLDS]
    return ", ".join([f"{m} codes" for m in parts if m not in FOLDS] + (["+".join(folds)] if folds else []))


def format_text(d: dict) -> str:
    meta = d.get("metadata") or {}
    lines = [f"{d['artifact']} ({d['kind']}, {_mib(d['file_bytes'])})"]
    if meta:
        lines.append(f"  model {meta.get('model')} ({meta.get('family')}), context {meta.get('max_seq_len')}, "
                     f"sliding window {meta.get('sliding_window')}, weights {meta.get('weight_dtype')}, "
                     f"quantization {meta.get('quantization') or 'none'}"
                     + (f" ({method_text(meta['quant_method'])})"
                        if meta.get("quant_method") else "")
                     + f", vocab {meta.get('vocab_size')}, "
                     f"instruction-tuned {meta.get('instruction_tuned')}")
    else:
        lines.append("  no gemma-edge metadata (not exported by this tool?)")
    if "bundle" in d:
        b = d["bundle"]
        lines.append(f"bundle v{b['version']}: " + ", ".join(
            f"{s['type']}{' ' + s['model_type'] if 'model_type' in s else ''} {_mib(s['bytes'])}" for s in b["sections"]))
        llm = d.get("llm_metadata") or {}

        def ids(u):
            return u.get("tokenIds", {}).get("ids", u.get("tokenStr"))
        lines.append(f"  LlmMetadata: start {ids(llm.get('startToken', {}))}, stop "
                     f"{[ids(t) for t in llm.get('stopTokens', [])]}, max_num_tokens {llm.get('maxNumTokens')}, "
                     f"model type {next(iter(llm.get('llmModelType', {'-': 0})))}")
        if "promptTemplates" in llm:
            lines.append("  prompt templates: " + json.dumps(llm["promptTemplates"]))
        if "jinjaPromptTemplate" in llm:
            lines.append(f"  Jinja chat template: {len(llm['jinjaPromptTemplate'])} characters")
        ex = (d.get("executor_metadata") or {}).get("llmExecutorMetadata", {})
        if ex:
            types = collections.Counter(sb.get("type", "TYPE_UNSPECIFIED") for sb in ex.get("stateBuffers", []))
            lines.append(f"  ExecutorMetadata: max_history_size {ex.get('maxHistorySize')}, state buffers "
                         + ", ".join(f"{k.removeprefix('TYPE_').lower()} x{v}" for k, v in types.items()))
    if "signatures" in d:
        for name, sig in d["signatures"].items():
            shapes = {n: list(s) for n, s, _ in sig["inputs"]}
            if "tokens" not in shapes:  # the vision encoder
                outs = [f"{n}{list(s)}" for n, s, _ in sig["outputs"]]
                lines.append(f"signature {name}: {' '.join(f'{n}{s}' for n, s in shapes.items())} -> {' '.join(outs)}")
                continue
            named = ("tokens", "input_pos", "embeddings", "mask")
            ins = [f"{n}{shapes[n]}" for n in named if n in shapes]
            outs = [f"{n}{list(s)}" for n, s, _ in sig["outputs"] if n == "logits"]
            n_states = len([1 for n, _, _ in sig["inputs"] if n not in named])
            lines.append(f"signature {name}: {' '.join(ins)} + {n_states} states -> {' '.join(outs)} + states")
    else:
        ins = [f"{n}{list(s)}" for n, s, _ in d["inputs"] if n in ("input_ids", "attention_mask", "position_ids")]
        lines.append(f"inputs: {' '.join(ins)} + {len(d['states'])} states -> logits + {len(d['states'])} states")
        for file, g in (d.get("vision") or {}).items():
            lines.append(f"{file} ({_mib(g['bytes'])}): " + " ".join(f"{n}{s}" for n, s in g["inputs"])
                         + " -> " + " ".join(f"{n}{s}" for n, s in g["outputs"]))
    by_kind = collections.Counter()
    for s in d["states"]:
        by_kind[s["kind"] or "?"] += s["bytes"]
    lines.append(f"states ({len(d['states'])}, {_mib(sum(by_kind.values()))}): "
                 + ", ".join(f"{k} {_mib(v)}" for k, v in by_kind.items()))
    if d.get("kv_bytes_per_token"):
        buckets = (d.get("metadata") or {}).get("context_buckets") or []
        lines.append(f"KV bytes per token: {d['kv_bytes_per_token'] / 1024:.1f} KiB (global layers); context "
                     f"buckets: {', '.join(map(str, buckets)) if buckets else 'none'}")
    shapes = collections.Counter((s["kind"] or "?", tuple(s["shape"]), s["dtype"]) for s in d["states"])
    for (kind, shape, dtype), n in shapes.items():
        lines.append(f"  {n} x {kind} {list(shape)} {dtype}")
    ops = d.get("decode_ops") or d.get("ops") or {}
    label = "decode ops" if "decode_ops" in d else "ops"
    lines.append(f"{label} ({sum(ops.values())}): " + ", ".join(f"{k} {v}" for k, v in list(ops.items())[:14]))
    if d.get("composites"):
        lines.append("composites: " + (", ".join(f"{k} x{v}" for k, v in sorted(d["composites"].items())) or "none"))
    if d.get("custom_ops"):
        lines.append(f"CUSTOM ops: {d['custom_ops']}")
    if d.get("contrib_ops"):
        lines.append("contrib ops: " + ", ".join(d["contrib_ops"]))
    lines.append("weights (stored form by use):")
    for use, forms in d["weights"].items():
        for form, (n, size) in forms.items():
            lines.append(f"  {use:<30} {form:<36} {n:>4} tensors {_mib(size):>12}")
    if d["kind"] == "onnx":
        g = (d.get("genai_config") or {}).get("model", {})
        lines.append(f"genai_config: type {g.get('type')}, context_length {g.get('context_length')}, vocab "
                     f"{g.get('vocab_size')}" if g else "genai_config: none")
        lines.append("tokenizer files: " + (", ".join(d["tokenizer_files"]) or "none"))
    tok = d.get("tokenizer")
    if tok:
        lines.append(f"tokenizer: SentencePiece, {tok['pieces']} pieces, bos {tok['bos']}, eos {tok['eos']}, "
                     f"turn markers {tok['start_of_turn']}/{tok['end_of_turn']}, {_mib(tok['bytes'])}")
    elif d["kind"] != "onnx":
        lines.append("tokenizer: none in the artifact (pass --tokenizer when running it)")
    return "\n".join(lines)


def verdict(path: Path) -> dict:
    """The parity verdict of an artifact, from the report the export wrote beside it (NAME.parity.json,
    or parity.json inside an ONNX folder): {"verdict": PASSED | FAILED | NOT VERIFIED, "why": ...}."""
    from export.driver import artifact_bytes
    from verify.gate import parity_path

    path = Path(path)
    report = parity_path(path)
    if not report.exists():
        return {"verdict": "NOT VERIFIED", "why": f"no parity report ({report.name}) beside it"}
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return {"verdict": "NOT VERIFIED", "why": f"{report.name} is not a parity report"}
    size = data.get("artifact_bytes")
    if data.get("artifact") != path.name or (size is not None and size != artifact_bytes(path)):
        return {"verdict": "NOT VERIFIED", "why": f"{report.name} reports on another file"}
    if not data.get("verified", True):
        return {"verdict": "NOT VERIFIED", "why": "exported with --no-verify"}
    gate = data.get("gate") or {}
    method = f" ({gate['quant_method']})" if gate.get("quant_method") else ""
    what = f"{gate['quantization']}{method} thresholds" if gate.get("quantization") else "float tolerance"
    if "mean_rel_rms" in data and gate.get("quantization"):
        figures = (f"mean rel RMS {data['mean_rel_rms']:.2e}, top-1 {data.get('top1_agreement', 0):.3f}, "
                   f"mean KL {data.get('mean_kl', 0):.2e}")
    else:
        figures = f"max rel RMS {data.get('max_rel_rms', float('nan')):.2e}, greedy {data.get('greedy_match')}"
    return {"verdict": "PASSED" if data.get("passed") else "FAILED", "why": f"{figures} ({what}; {report.name})"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export inspect", description="print what an artifact holds")
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--json", action="store_true", help="everything as JSON")
    ap.add_argument("--report", action="store_true",
                    help="the parity report as a table (per prompt: calls, relative RMS, KL, top-1, greedy match)")
    args = ap.parse_args(argv)
    try:
        d = describe(args.artifact)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    v = verdict(args.artifact)
    d["parity"] = v
    if args.report:
        from verify.gate import parity_path
        from verify.plot import table

        report = parity_path(args.artifact)
        if not report.exists():
            print(f"error: {args.artifact} has no parity report ({report.name}); export it without --no-verify",
                  file=sys.stderr)
            return 2
        png = report.with_suffix(".png")
        print(f"parity: {v['verdict']}: {v['why']}\n{table(report)}" + (f"\npicture: {png}" if png.exists() else ""))
        return 0
    print(json.dumps(d, indent=1, default=str) if args.json else f"parity: {v['verdict']}: {v['why']}\n" + format_text(d))
    return 0
