"""The cost of the main demo's short mosaic stage alone: a freshly attached demo model (the demo runs the
stage after its classification fine-tune) goes through the stage; prints process CPU and wall seconds.

    OMP_NUM_THREADS=1 python benchmarks/mosaic_stage_cost.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_adapters.builder import attach  # noqa: E402
from vlm_adapters.demo.assets import efficientnet_lite0, smollm2_instruct  # noqa: E402
from vlm_adapters.demo.classification import DemoOptions, DemoReport, _mosaics  # noqa: E402


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts = DemoOptions(output_dir="runs/mosaic_stage")
    encoder, processor = efficientnet_lite0()
    model = attach(encoder, smollm2_instruct(), image_processor=processor, adapter="lora", quantization="nf4",
                   num_image_tokens=opts.num_image_tokens, system_prompt=opts.system_prompt, seed=opts.seed)
    report = DemoReport(options=vars(opts))
    cpu, wall = time.process_time(), time.perf_counter()
    _mosaics(report, model, opts)
    figures = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1),
               "load_average": os.getloadavg(), **report.figures}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
