"""Fine-tune an LLM to classify and describe a folder of images, e.g. a chest X-ray collection:

    data/chest_xray/NORMAL/*.jpeg
    data/chest_xray/PNEUMONIA/*.jpeg

    python examples/finetune_imagefolder.py data/chest_xray \
        --vision google/siglip-base-patch16-224 --llm HuggingFaceTB/SmolLM2-360M-Instruct \
        --output runs/xray [--push me/xray-adapter]

Class names come from the sub-folder names (datasets' `imagefolder` builder). With a single split,
a stratified 10% is held out for evaluation. The code path is the one `vlm-adapters demo` runs;
only the model ids and the data source differ.
"""

from __future__ import annotations

import argparse
import json

from vlm_adapters import attach, load_data, split_for_eval


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir")
    parser.add_argument("--vision", default="google/siglip-base-patch16-224")
    parser.add_argument("--llm", default="HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--adapter", default="lora", choices=["lora", "prefix", "none"])
    parser.add_argument("--output", default="runs/imagefolder")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--num-image-tokens", type=int, default=None)
    parser.add_argument("--push", default=None, help="Hub repo id to push the adapter to")
    args = parser.parse_args(argv)

    train, test = split_for_eval(load_data(args.data_dir))
    model = attach(args.vision, args.llm, adapter=args.adapter, num_image_tokens=args.num_image_tokens)
    model.fit(train, test, output_dir=args.output, num_train_epochs=args.epochs)
    metrics = model.evaluate(test, output_dir=args.output)
    names = train.features["label"].names
    print(json.dumps({k: metrics[k] for k in ("accuracy", "macro_f1")}, indent=2))
    print(model.classify(test[0]["image"], names))
    print(model.describe(test[0]["image"]))
    model.save_pretrained(f"{args.output}/adapter")
    if args.push:
        print(model.push_to_hub(args.push))
    return metrics


if __name__ == "__main__":
    main()
