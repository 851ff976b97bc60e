"""The graphs and JSON files onnxruntime-genai's Gemma 3 vision-language pipeline runs
(`"type": "gemma3"`), measured with onnxruntime-genai 0.18 (docs/vision.md has the experiments).

What onnxruntime-genai does with a prompt and images:

  processor (onnxruntime-extensions, `processor_config.json`): each image is decoded to RGB,
      resized to S x S (Pillow-compatible bilinear: `"interpolation": "LINEAR"`, aspect ratio not
      kept), rescaled by 1/255, normalised with mean = std = 0.5 and made channels-first, then
      stacked: pixel_values f32 [N, 3, S, S]. Each `<start_of_image>` of the text becomes
      "\\n\\n<start_of_image>" + 256 x "<image_soft_token>" + "<end_of_image>\\n\\n" before tokenizing
      (256 is fixed in onnxruntime-genai; Gemma 3's towers give 256 soft tokens).
  vision.onnx:      pixel_values [N, 3, S, S] -> image_features [N, I, E]
      Our tower (the `vision_encoder` signature, one image [1, S, S, 3] channels last) run by a
      Scan over the images, so one image's activations are alive at a time; the weights stay in
      the outer graph. The rank-3 output is what onnxruntime-genai pre-allocates for N images.
  embedding.onnx:   input_ids int64 [B, T], image_features (any rank) -> inputs_embeds [B, T, E]
      Row k of the flattened features at the k-th soft token, zeros elsewhere: the decoder reads
      only the soft-token rows (text rows come from its own table, scaled). image_features is
      declared without a shape because onnxruntime-genai feeds [N, I, E] with images and an
      empty [0, E] without (a declared rank refuses one or the other).
  decoder:          image_prefill.onnx, unchanged: onnxruntime-genai feeds it `input_ids` as well
      as `inputs_embeds`, so the bidirectional attention inside each image is built from the ids
      in the graph exactly as runtime_py's image chunks do; the whole prompt goes in one call, so
      every image is whole. Decode steps run the same graph (inputs_embeds unused there).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.config import VisionConfig

VISION, EMBEDDING, PROCESSOR = "vision.onnx", "embedding.onnx", "processor_config.json"
PIXEL_VALUES, IMAGE_FEATURES, INPUTS_EMBEDS = "pixel_values", "image_features", "inputs_embeds"
GENAI_IMAGE_TOKENS = 256  # soft tokens per image in onnxruntime-genai's Gemma 3 processor


def scan_over_images(model: onnx.ModelProto, vcfg: VisionConfig, text_dim: int) -> onnx.ModelProto:
    """Rewrite a lowered `vision_encoder` graph (image [1, S, S, 3] -> soft_tokens [1, I, E], no
    initializers yet: `save` attaches them to the outer graph) in place into vision.onnx's form:
    pixel_values [N, 3, S, S] -> image_features [N, I, E], the tower as the body of a Scan."""
    g = model.graph
    s, n, e = vcfg.image_size, vcfg.tokens_per_image, text_dim
    (image,), (soft,) = g.input, g.output
    axis0 = "scan_over_images/axis0"
    body_nodes = [helper.make_node("Transpose", ["pixels_chw"], ["pixels_hwc"], perm=[1, 2, 0]),
                  helper.make_node("Unsqueeze", ["pixels_hwc", axis0], [image.name]),
                  *g.node,
                  helper.make_node("Squeeze", [soft.name, axis0], ["features"])]
    body = helper.make_graph(body_nodes, "encode_one_image",
                             [helper.make_tensor_value_info("pixels_chw", TensorProto.FLOAT, [3, s, s])],
                             [helper.make_tensor_value_info("features", TensorProto.FLOAT, [n, e])])
    scan = helper.make_node("Scan", [PIXEL_VALUES], [IMAGE_FEATURES], num_scan_inputs=1, body=body,
                            name="encode_images")
    del g.node[:], g.input[:], g.output[:]
    g.node.append(scan)
    g.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axis0))
    g.input.append(helper.make_tensor_value_info(PIXEL_VALUES, TensorProto.FLOAT, ["num_images", 3, s, s]))
    g.output.append(helper.make_tensor_value_info(IMAGE_FEATURES, TensorProto.FLOAT, ["num_images", n, e]))
    g.name = "vision"
    return model


def embedding_model(vcfg: VisionConfig, text_dim: int, ir_version: int) -> onnx.ModelProto:
    """embedding.onnx (module docstring): no weights, a gather of the image features."""
    e = text_dim
    consts = [numpy_helper.from_array(np.array([-1, e], np.int64), "flat_shape"),
              numpy_helper.from_array(np.zeros((1, e), np.float32), "zero_row"),
              numpy_helper.from_array(np.array(vcfg.soft_token, np.int64), "soft_token"),
              numpy_helper.from_array(np.array(1, np.int64), "sequence_axis")]
    nodes = [
        helper.make_node("Reshape", [IMAGE_FEATURES, "flat_shape"], ["rows"]),
        helper.make_node("Concat", ["zero_row", "rows"], ["table"], axis=0),  # row 0: zeros for text positions
        helper.make_node("Equal", ["input_ids", "soft_token"], ["is_soft"]),
        helper.make_node("Cast", ["is_soft"], ["soft_count"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["soft_count", "sequence_axis"], ["soft_index"]),  # k at the k-th soft token
        helper.make_node("Mul", ["soft_index", "soft_count"], ["row"]),
        helper.make_node("Gather", ["table", "row"], [INPUTS_EMBEDS], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info(IMAGE_FEATURES, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(INPUTS_EMBEDS, TensorProto.FLOAT, ["batch_size", "sequence_length", e])],
        consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gemma-edge")
    model.ir_version = ir_version
    return model


def processor_config(vcfg: VisionConfig) -> dict:
    """processor_config.json for onnxruntime-extensions' `gemma_3_image_processing`: the steps of
    runtime_py/image.py (HF's Gemma3ImageProcessor). The resize must be LINEAR with the aspect
    ratio not kept (the extensions' defaults keep it, and the published Gemma 3 example uses CUBIC,
    0.2 off per pixel at 896); Normalize needs the means and deviations spelled out (its default
    is CLIP's)."""
    s = vcfg.image_size

    def op(name, kind, **attrs):
        return {"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}

    return {"processor": {"name": "gemma_3_image_processing", "transforms": [
        op("decode_image", "DecodeImage", color_space="RGB"),
        op("resize", "Resize", interpolation="LINEAR", width=s, height=s, keep_aspect_ratio=0),
        op("re-scale", "Rescale"),
        op("normalize", "Normalize", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        op("to_channel_first", "Permute3D", dims=[2, 0, 1]),
    ]}}


def vision_sections(decoder: dict) -> dict:
    """genai_config.json's model sections for the vision-language pipeline, given the text
    decoder's section: the decoder becomes image_prefill.onnx with an inputs_embeds input."""
    from contract.onnx import IMAGE_PREFILL

    inputs = {"input_ids": "input_ids", "inputs_embeds": INPUTS_EMBEDS,
              **{k: v for k, v in decoder["inputs"].items() if k != "input_ids"}}
    return {
        "decoder": {**decoder, "filename": IMAGE_PREFILL, "inputs": inputs},
        "embedding": {"filename": EMBEDDING, "inputs": {"input_ids": "input_ids", "image_features": IMAGE_FEATURES},
                      "outputs": {"inputs_embeds": INPUTS_EMBEDS}},
        "vision": {"filename": VISION, "config_filename": PROCESSOR, "inputs": {"pixel_values": PIXEL_VALUES},
                   "outputs": {"image_features": IMAGE_FEATURES}},
    }
