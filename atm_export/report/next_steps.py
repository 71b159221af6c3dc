"""report.md's last section: what to do with the run's files, as commands for those very files.

Every command names files of the output directory (``directory``) that the run wrote, the
plugin library by its path where it is known, and the engine's batch range and input shape
from the report. Nothing here runs anything.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .model import Report

#: The shell variable the commands use for the plugin library.
PLUGIN_VAR = "$ATM_PLUGIN"


def next_steps(report: Report, directory: Path, plugin_library: str | None) -> list[str]:
    """Markdown lines: TensorRT (trtexec, polygraphy, Python), ONNX Runtime (Python), and which
    models to deploy. ``plugin_library``: the plugin's path where it was found or used, else None."""
    d = Path(shlex.quote(str(directory.resolve())))  # pasted into a shell as it is
    lines = ["", "## Next steps", "", f"The files named below are in `{d}`."]
    lines += _when_to_deploy(report)
    if "model.plugin.onnx" in report.artifacts:
        lines += _tensorrt(report, d, plugin_library)
    if "model.onnx" in report.artifacts:
        lines += _onnx_runtime(report, d)
        lines += _openvino(report, d)
    if report.triton:
        repo = shlex.quote(report.triton["path"])
        lines += ["", "### Triton Inference Server", "",
                  f"The model repository `{repo}` serves {', '.join(f'`{m}`' for m in report.triton['models'])} "
                  "(docs/serving.md; its README.md says how to load the plugin):", "", "```sh",
                  f"tritonserver --model-repository={repo}", "```"]
    lines += ["", f"Re-check these files in CI: `atm-export check {d}`."]
    return lines


def _shape(report: Report, batch: int) -> list[int]:
    return [batch, *report.signature["inputs"][0]["shape"][1:]]


def _batches(report: Report) -> tuple[int, int, int]:
    """The engine's batch range, or (1, sample batch, largest batch the run used) without one."""
    profile = (report.tensorrt or {}).get("profile")
    if profile:
        return profile["min"], profile["opt"], profile["max"]
    used = [int(b) for p in report.parity.values() for b in p.batches] or [report.images["count"]]
    return 1, report.images["count"], max(used + [report.images["count"]])


def _tensorrt(report: Report, d: Path, plugin_library: str | None) -> list[str]:
    low, opt, high = _batches(report)
    x = "x".join
    trt_shape = lambda b: x(str(v) for v in _shape(report, b))  # noqa: E731
    poly_shape = lambda b: "[" + ",".join(str(v) for v in _shape(report, b)) + "]"  # noqa: E731
    if plugin_library:
        where = f"export ATM_PLUGIN={plugin_library}"
    else:
        where = "export ATM_PLUGIN=/path/to/libatm_token_merge_plugin.so  # the path `atm-export build-plugin` prints"
    fp16 = "model.fp16.plugin.onnx" in report.artifacts  # --trt-precision fp16: the fp16-typed graph
    graph = "model.fp16.plugin.onnx" if fp16 else "model.plugin.onnx"
    build = (f"trtexec --onnx={d}/{graph} --staticPlugins={PLUGIN_VAR} "
             f"--minShapes=images:{trt_shape(low)} --optShapes=images:{trt_shape(opt)} "
             f"--maxShapes=images:{trt_shape(high)} " + ("--stronglyTyped " if fp16 else "--noTF32 ") +
             f"--saveEngine={d}/model.engine")
    lines = ["", "### TensorRT", "",
             "The TokenMerge plugin library must be loaded wherever the engine is built or run "
             "(the same TensorRT version and GPU that built it).", "", "```sh", where, build]
    if "model.engine" in report.artifacts:
        lines += [f"trtexec --loadEngine={d}/model.engine --staticPlugins={PLUGIN_VAR} --shapes=images:{trt_shape(opt)}"]
    lines += [
        "# the engine against ONNX Runtime on the portable model, on the same random inputs:",
        f"polygraphy run {d}/model.onnx --onnxrt --input-shapes images:{poly_shape(opt)} "
        f"--save-inputs {d}/inputs.json --save-outputs {d}/ort_outputs.json",
        f"polygraphy run {d}/{graph} --trt --plugins {PLUGIN_VAR} "
        f"--trt-min-shapes images:{poly_shape(low)} --trt-opt-shapes images:{poly_shape(opt)} "
        f"--trt-max-shapes images:{poly_shape(high)} " + ("--strongly-typed " if fp16 else "") +
        f"--load-inputs {d}/inputs.json --load-outputs {d}/ort_outputs.json "
        + ("--atol 2e-2 --rtol 2e-2" if fp16 else "--atol 1e-5 --rtol 1e-4"),
        "```", "",
        "In Python, the merge steps' outputs have data-dependent shapes, so every output goes through an "
        "output allocator:", "", "```python", *_trt_snippet(d, _shape(report, opt)), "```"]
    if "model.static.plugin.onnx" in report.artifacts:
        lines += ["", "The static-schedule engine builds the same way from `model.static.plugin.onnx`. Its shapes are "
                  "static except the batch, so nothing is read back to the host between merge steps and it can "
                  "be run in a CUDA graph (`trtexec --useCudaGraph`), which the adaptive engine cannot."]
    return lines


def _trt_snippet(d: Path, shape: list[int]) -> list[str]:
    return [
        "import ctypes, os",
        "import tensorrt as trt, torch",
        "",
        'ctypes.CDLL(os.environ["ATM_PLUGIN"], mode=ctypes.RTLD_GLOBAL)  # registers TokenMerge',
        "logger = trt.Logger(trt.Logger.WARNING)",
        f'engine_file = "{d}/model.engine"  # from atm-export on a GPU machine, or trtexec above',
        "engine = trt.Runtime(logger).deserialize_cuda_engine(open(engine_file, 'rb').read())",
        "context = engine.create_execution_context()",
        "",
        "class Allocator(trt.IOutputAllocator):",
        "    def __init__(self):",
        "        super().__init__()",
        "        self.buffers, self.shapes = {}, {}",
        "    def reallocate_output(self, name, memory, size, alignment):",
        "        self.buffers[name] = torch.empty(max(size, 1), dtype=torch.uint8, device='cuda')",
        "        return self.buffers[name].data_ptr()",
        "    def reallocate_output_async(self, name, memory, size, alignment, stream):",
        "        return self.reallocate_output(name, memory, size, alignment)",
        "    def notify_shape(self, name, shape):",
        "        self.shapes[name] = tuple(shape)",
        "",
        "allocator = Allocator()",
        "for name in ('logits', 'tokens_per_layer'):",
        "    context.set_output_allocator(name, allocator)",
        f"images = torch.randn({', '.join(map(str, shape))}, device='cuda')  # preprocessed as report.json says",
        "context.set_input_shape('images', tuple(images.shape))",
        "context.set_tensor_address('images', images.data_ptr())",
        "stream = torch.cuda.Stream()",
        "context.execute_async_v3(stream.cuda_stream)",
        "stream.synchronize()",
        "shape = allocator.shapes['logits']",
        "logits = allocator.buffers['logits'][: 4 * shape[0] * shape[1]].view(torch.float32).view(shape)",
    ]


def _onnx_runtime(report: Report, d: Path) -> list[str]:
    p = report.preprocessing
    size = p.get("input_size", [3, 224, 224])
    return ["", "### ONNX Runtime", "",
            "`model.onnx` holds standard ops only; any ONNX Runtime runs it. Preprocessing (also in report.json "
            f"and in each file's metadata): resize with {p.get('interpolation', '-')} interpolation, crop_pct "
            f"{p.get('crop_pct', '-')} ({p.get('crop_mode', '-')}), mean {p.get('mean', '-')}, std {p.get('std', '-')}.",
            "", "```python",
            "import onnxruntime as ort",
            "from PIL import Image",
            "from timm.data import create_transform",
            "",
            f"transform = create_transform(input_size={tuple(size)}, interpolation={p.get('interpolation')!r}, "
            f"crop_pct={p.get('crop_pct')}, crop_mode={p.get('crop_mode')!r}, mean={tuple(p.get('mean', ()))}, "
            f"std={tuple(p.get('std', ()))})",
            'images = transform(Image.open("photo.jpg").convert("RGB"))[None].numpy()',
            f'session = ort.InferenceSession("{d}/model.onnx")',
            'logits, tokens_per_layer = session.run(None, {"images": images})',
            "```"]


def _openvino(report: Report, d: Path) -> list[str]:
    """OpenVINO on ``model.onnx``, at the precision the run found best checked (bf16 where it ran)."""
    bf16 = "openvino_bf16" in report.parity
    hint = "bf16" if bf16 else "f32"
    why = ("bf16 where the CPU has it (what `openvino_bf16` in this report ran; see its parity notes), or \"f32\" "
           "for fp32's figures" if bf16 else "\"f32\" pins fp32: OpenVINO's CPU default is bf16 wherever the CPU has it")
    return ["", "### OpenVINO", "",
            "OpenVINO reads `model.onnx` as it is, data-dependent token counts included (`pip install "
            "'atm-export[openvino]'`; preprocess the images as for ONNX Runtime above). INFERENCE_PRECISION_HINT: "
            f"{why}.", "", "```python",
            "import openvino as ov",
            "",
            "core = ov.Core()",
            f'compiled = core.compile_model("{d}/model.onnx", "CPU", {{"INFERENCE_PRECISION_HINT": "{hint}"}})',
            "result = compiled.create_infer_request().infer({\"images\": images})",
            'logits, tokens_per_layer = result["logits"], result["tokens_per_layer"]',
            "```"]


def _when_to_deploy(report: Report) -> list[str]:
    static = report.static_schedule
    if static is None:
        return ["", "For the lowest latency at small batch sizes, add `--static-schedule sample` (or a schedule "
                "measured on your images): it also writes fixed-r models whose shapes are all static but the batch."]
    return ["", "Which models to deploy:", "",
            "- **adaptive** (`model.plugin.onnx`, `model.onnx`, `model.engine`): each batch merges as its content "
            "allows; this is ATM as published and what its accuracy figures describe, and the choice for "
            "throughput at large batches.",
            f"- **static** (`model.static.plugin.onnx`, `model.static.onnx`, `model.static.engine`): every batch "
            f"merges r = {static.r_per_layer} per block (from {static.source}, {static.gflops:.4g} GFLOPs). Only the "
            "batch dimension is dynamic, so TensorRT optimises fully and CUDA graphs can capture it: the choice "
            "for low latency at small batches, at the accuracy of that fixed schedule. Its accuracy on your "
            f"images: `{_eval_command(report)}`."]


def _eval_command(report: Report) -> str:
    """``atm-export eval`` of the eager model that the static-schedule models replay."""
    params = report.settings.params
    r = ",".join(str(v) for v in report.static_schedule.r_per_layer)
    attn = "--prop-attn" if params.get("prop_attn") else "--no-prop-attn"
    return (f"atm-export eval {report.model.name} --data YOUR_IMAGES --policy tome --r {r} "
            f"--split-layer {params['split_layer']} {attn}")
