"""Time the plugin flavour's export, block by block or traced whole, in a fresh process.

    .venv/bin/python benchmarks/bench_export.py deit_s            # block by block (the default export)
    .venv/bin/python benchmarks/bench_export.py deit_s --whole    # the whole model in one trace
    .venv/bin/python benchmarks/bench_export.py deit_t --repeat 2 # the second export: no first-call cost

The model has random weights and the scaling table's settings (alpha 0.99, beta 0.02,
theta_min 0.875); the example is two of the built-in sample images. No trace cache is used, so
the first export pays the exporter's first call in a process, as a run's export does; later
ones (``--repeat``) show what is left without it. Prints the seconds each
``export_plugin_flavour`` call took and the TokenMerge nodes it wrote.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_export import MergeConfig, patch_model  # noqa: E402
from atm_export.export.onnx import export_plugin_flavour  # noqa: E402
from atm_export.images import builtin_images, preprocess  # noqa: E402
from atm_export.registry import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a registry name (deit_s) or a timm name")
    parser.add_argument("--whole", action="store_true", help="trace the whole model at once")
    parser.add_argument("--repeat", type=int, default=1, help="exports in the same process")
    args = parser.parse_args()

    import timm

    vit = timm.create_model(resolve_model(args.model).timm_name, pretrained=False).eval()
    atm = patch_model(vit, MergeConfig(alpha=0.99, beta=0.02, theta_min=0.875))
    images = preprocess(builtin_images(2), vit)
    for run in range(1, args.repeat + 1):
        start = time.perf_counter()
        graph = export_plugin_flavour(atm, images, blockwise=not args.whole)
        seconds = time.perf_counter() - start
        merges = sum(n.op_type == "TokenMerge" for n in graph.graph.node)
        print(f"{args.model}: {'whole' if args.whole else 'blockwise'} export {run}: {seconds:.1f} s, "
              f"{merges} TokenMerge nodes")


if __name__ == "__main__":
    main()
