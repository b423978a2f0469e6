"""Section 5: the machine's bf16 / fp32 matmul peak and the share of it a library training step reaches."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from benchmarks.common import SEED, log, stat, stopwatch
from benchmarks.context import Context
from benchmarks.scaling import time_train_steps
from vlm_adapters import VisionLanguageModel, VLMCollator
from vlm_adapters.packing import PackedBatch
from vlm_adapters.prompting import IGNORE_INDEX


def matmul_gflops(n: int, dtype: torch.dtype, reps: int) -> list[float]:
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    values = []
    for _ in range(reps):
        with stopwatch() as t:
            torch.mm(a, b)
        values.append(2 * n**3 / t[0] / 1e9)
    return values


def linear_params(llm: nn.Module) -> tuple[int, int, int]:
    """(non-embedding linear weights incl. LoRA, hidden size, vocabulary size) of the LLM."""
    total = 0
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            total += module.in_features * module.out_features  # Linear4bit packs weights; count logical size
    head = llm.get_output_embeddings()
    return total, head.in_features, head.out_features


def step_flops(ctx: Context, model: VisionLanguageModel, data: Any) -> dict[str, float]:
    """FLOPs of one training sample: 6 * N * tokens (as trained: each batch packed, its shared head
    once, no padding) plus the LM head at the supervised positions only (2*d*V forward + 2*d*V for
    the input gradient)."""
    n_linear, d, vocab = linear_params(model.base_llm)
    collator = VLMCollator(model, ctx.names)
    tokens = kept = 0
    bs = ctx.sizes.batch_size
    for start in range(0, len(data), bs):  # dataset order; training shuffles, so this is an estimate
        batch = collator([data[i] for i in range(start, min(start + bs, len(data)))])
        tokens += len(PackedBatch.build(batch["input_ids"], batch["attention_mask"], batch["labels"]).input_ids)
        kept += int((batch["labels"] != IGNORE_INDEX).sum())
    per_sample_tokens, per_sample_kept = tokens / len(data), kept / len(data)
    body = 6 * n_linear * per_sample_tokens
    head = 4 * d * vocab * per_sample_kept
    # Frozen NF4 weights get no weight gradient: forward (2N) + input gradient (2N) only, plus LoRA's own.
    n_lora = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    frozen_body = 4 * n_linear * per_sample_tokens + 2 * n_lora * per_sample_tokens
    return {"n_linear": n_linear, "tokens": per_sample_tokens, "kept": per_sample_kept, "body": body, "head": head,
            "total": body + head, "computed": frozen_body + head}


def bench_peak(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    log(f"peak: {s.matmul_size}x{s.matmul_size} matmuls")
    out: dict[str, Any] = {
        "bf16": matmul_gflops(s.matmul_size, torch.bfloat16, s.matmul_reps),
        "fp32": matmul_gflops(s.matmul_size, torch.float32, s.matmul_reps),
    }
    log(f"peak: bf16 {statistics.median(out['bf16']):.1f} GFLOP/s, fp32 {statistics.median(out['fp32']):.1f} GFLOP/s")
    train_f = ctx.features("train")
    scaling = ctx.results.get("scaling", {}).get("tokens", {}).get(s.num_image_tokens)
    if scaling is not None:
        per_sample, source = scaling["per_sample"], "the section-4 timing"
    else:
        per_sample = time_train_steps(ctx, s.num_image_tokens, ctx.features("scaling"))
        source = "a timing made here the way section 4 makes it"
    out.update(per_sample=per_sample, source=source)
    model = ctx.model(s.num_image_tokens)
    flops = step_flops(ctx, model, train_f)
    out["flops"] = flops
    out["compute_dtype"] = model.config.compute_dtype
    out["achieved"] = [flops["total"] / t / 1e9 for t in per_sample]
    # Matmul peaks and step times come from different repeats; the share uses the medians.
    out["share_bf16"] = [a / statistics.median(out["bf16"]) for a in out["achieved"]]
    out["share_fp32"] = [a / statistics.median(out["fp32"]) for a in out["achieved"]]
    out["achieved_4n"] = [flops["computed"] / t / 1e9 for t in per_sample]
    out["share_bf16_4n"] = [a / statistics.median(out["bf16"]) for a in out["achieved_4n"]]
    out["share_fp32_4n"] = [a / statistics.median(out["fp32"]) for a in out["achieved_4n"]]
    return out


def report_peak(ctx: Context, res: dict[str, Any]) -> str:
    s, f = ctx.sizes, res["flops"]
    return "\n".join([
        "## 5. Share of the machine's matmul peak",
        "",
        f"Peak: `torch.mm` of two {s.matmul_size}x{s.matmul_size} matrices, {s.matmul_reps} timed repetitions after a "
        f"warm-up, {ctx.threads} thread(s). Library training step: {s.batch_size} samples, time per sample from "
        f"{res['source']} ({s.num_image_tokens} image tokens). FLOPs per sample = 6 x {f['n_linear'] / 1e6:.1f}M "
        f"non-embedding linear weights (blocks + LoRA) x {f['tokens']:.1f} tokens (each batch packed: its shared "
        "head once, no padding) "
        f"+ the LM head at the {f['kept']:.2f} supervised positions only (4 x d x V: forward and input gradient) = "
        f"{f['total'] / 1e9:.1f} GFLOP, {f['total'] * s.batch_size / 1e12:.2f} TFLOP per step of {s.batch_size} "
        f"({f['head'] / f['total']:.1%} in the head). The 6N rule counts weight "
        "gradients the frozen NF4 weights never get, so it overstates the work; the second row counts what is "
        f"computed (4N x tokens + LoRA's weight gradients + the head = {f['computed'] / 1e9:.1f} GFLOP per sample, "
        "NF4 dequantization and attention not counted). The LLM computed in "
        f"{res['compute_dtype']} (`compute_dtype=\"auto\"` times a bf16 and an fp32 matmul at attach and takes bf16 "
        "only when it is clearly faster; NF4 weights are dequantized to it), so the "
        f"{'bf16' if res['compute_dtype'] == 'bfloat16' else 'fp32'} peak is the relevant ceiling; LoRA, norms and "
        "the head stay float32.",
        "",
        "| | GFLOP/s, median (min-max) | share of bf16 peak | share of fp32 peak |",
        "|---|---|---|---|",
        f"| bf16 matmul | {stat(res['bf16'])} | | |",
        f"| fp32 matmul | {stat(res['fp32'])} | | |",
        f"| library training step, 6N count (as specified) | {stat(res['achieved'])} | "
        f"{stat(res['share_bf16'], 100, '%')} | "
        f"{stat(res['share_fp32'], 100, '%')} |",
        f"| library training step, frozen-weight count | {stat(res['achieved_4n'])} | "
        f"{stat(res['share_bf16_4n'], 100, '%')} | {stat(res['share_fp32_4n'], 100, '%')} |",
        *(
            ["", "A share above 100% means the matmul peak was measured low (other load on the machine during those "
             "few seconds) or the FLOP count overstates the work; compare the rows rather than trust it."]
            if max(res["share_fp32"]) > 1 else []
        ),
    ])


