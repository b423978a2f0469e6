"""Section 3: peak RSS of a ~1.1B-parameter Llama loaded in NF4 (the library's loader and transformers')
against bf16, each in a fresh subprocess."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from typing import Any

import torch

from benchmarks.common import ROOT, SEED, log, num, ratios, stat
from benchmarks.context import Context

MEMORY_CHILD = r"""
import json, resource, sys, time
mode, path, threads, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
import torch, transformers
torch.set_num_threads(threads)
out = {"mode": mode}
if mode.startswith("baseline_"):  # the code a load imports before any weight: Llama modeling (+ bitsandbytes ...)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM
    if mode == "baseline_bnb":
        import bitsandbytes
    if mode == "baseline_library":
        import vlm_adapters.llm
else:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    start = time.perf_counter()
    if mode == "nf4":  # the library's loader, as attach(quantization="nf4") calls it
        from vlm_adapters.config import AdapterConfig
        from vlm_adapters.llm import load_llm
        model = load_llm(path, AdapterConfig(quantization="nf4", compute_dtype="bfloat16"), torch.device("cpu"))
    elif mode == "nf4_transformers":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": "cpu"})
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out.update(seconds=time.perf_counter() - start, finite=bool(torch.isfinite(logits).all()),
               footprint_mib=model.get_memory_footprint() / 2**20,
               embedding_dtype=str(model.get_input_embeddings().weight.dtype))
with open("/proc/self/status") as fh:
    status = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in fh)
              if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
out.update(maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, status_mib=status)
print("RESULT " + json.dumps(out))
"""


def save_random_llm(config_kwargs: dict[str, int], folder: str, shard_bytes: int = 1 << 30) -> int:
    """A Llama with random bf16 weights, written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    config.dtype = torch.bfloat16  # so the NF4 load keeps embeddings / head in bf16 ("auto" dtype)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    pending: list[tuple[str, torch.Tensor]] = []
    written: list[list[str]] = []
    weight_map: dict[str, str] = {}
    total = params = 0

    def flush() -> None:
        fname = f"shard-{len(written):05d}.safetensors"  # renamed below once the count is known
        save_file(dict(pending), os.path.join(folder, fname), metadata={"format": "pt"})
        written.append([name for name, _ in pending])
        pending.clear()

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if pending and sum(t.nbytes for _, t in pending) + tensor.nbytes > shard_bytes:
            flush()
        pending.append((name, tensor))
        total += tensor.nbytes
        params += tensor.numel()
    flush()
    for i, names in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(folder, f"shard-{i:05d}.safetensors"), os.path.join(folder, fname))
        weight_map.update({name: fname for name in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    config.save_pretrained(folder)
    return params


LOADS = ("bf16", "nf4", "nf4_transformers")  # nf4: vlm_adapters' loader; nf4_transformers: from_pretrained
# What each load imports before reading a weight; "baseline_llama" (torch, transformers, Llama modeling) is
# imported by all three, so it is the common baseline every net figure subtracts.
IMPORTS = {"bf16": "baseline_llama", "nf4": "baseline_library", "nf4_transformers": "baseline_bnb"}
LABELS = {"bf16": "bf16", "nf4": "NF4 (library)", "nf4_transformers": "NF4 (transformers)"}
TARGET = 0.5


def run_child(ctx: Context, mode: str, folder: str) -> dict[str, Any]:
    """One load (or import baseline) in a fresh process, through a forking shell: Linux keeps ru_maxrss
    across execve, so a child exec'd straight from this (large) process would report this process's peak."""
    proc = subprocess.run(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", MEMORY_CHILD, mode, folder,
         str(ctx.threads), ROOT],
        capture_output=True, text=True, check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"memory child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if not mode.startswith("baseline") and not result["finite"]:
        raise RuntimeError(f"{mode}: the forward pass gave NaN/inf logits")
    return result


def bench_memory(ctx: Context) -> dict[str, Any]:
    folder = ctx.dir("random-llm")
    log(f"memory: writing a random bf16 Llama {ctx.sizes.memory_llm}")
    params = save_random_llm(ctx.sizes.memory_llm, folder)
    log(f"memory: {params / 1e9:.3f}B parameters saved")
    out: dict[str, Any] = {"params": params, "config": ctx.sizes.memory_llm, "runs": {}}
    for r in range(ctx.repeats):
        loads = LOADS[r % len(LOADS):] + LOADS[: r % len(LOADS)]  # rotate the order over the repeats
        for mode in (*sorted(set(IMPORTS.values())), *loads):
            result = run_child(ctx, mode, folder)
            out["runs"].setdefault(mode, []).append(result)
            status = ", ".join(f"{k} {v:.0f}" for k, v in result["status_mib"].items())
            log(f"memory repeat {r + 1} {mode}: ru_maxrss {result['maxrss_mib']:.0f} MiB ({status} MiB)")
    shutil.rmtree(folder, ignore_errors=True)
    peak = {m: [x["maxrss_mib"] for x in runs] for m, runs in out["runs"].items()}
    out["peak"] = peak
    # ru_maxrss and the kernel's high-water mark of this process image must agree (see run_child).
    out["maxrss_vs_hwm_mib"] = max(
        abs(x["maxrss_mib"] - x["status_mib"]["VmHWM"]) for runs in out["runs"].values() for x in runs
    )
    base = peak["baseline_llama"]
    out["net"] = {m: [p - b for p, b in zip(peak[m], base, strict=True)] for m in LOADS}
    for m in ("nf4", "nf4_transformers"):
        out.setdefault("ratio_raw", {})[m] = ratios(peak[m], peak["bf16"])
        out.setdefault("ratio_net", {})[m] = ratios(out["net"][m], out["net"]["bf16"])
    return out


def report_memory(ctx: Context, res: dict[str, Any]) -> str:
    peak, runs = res["peak"], res["runs"]
    fp = {m: runs[m][0]["footprint_mib"] for m in LOADS}
    rss = {(m, k): [x["status_mib"][k] for x in runs[m]] for m in LOADS for k in ("RssAnon", "RssFile")}

    def row(label: str, values: dict[str, list[float]], ratio: dict[str, list[float]] | None = None) -> str:
        cells = [stat(values[m]) for m in LOADS]
        cells += [stat(ratio[m], suffix="x") for m in ("nf4", "nf4_transformers")] if ratio else ["", ""]
        return f"| {label} | " + " | ".join(cells) + " |"

    return "\n".join([
        "## 3. Peak memory: NF4 vs bf16",
        "",
        memory_setup(res),
        "",
        "| | bf16 | NF4 (library) | NF4 (transformers) | library / bf16 | transformers / bf16 |",
        "|---|---|---|---|---|---|",
        row("peak RSS MiB, median (min-max) (headline)", peak, res["ratio_raw"]),
        row("peak RSS minus the common import baseline "
            f"({stat(peak['baseline_llama'])} MiB), MiB", res["net"], res["ratio_net"]),
        row("what the load imports before reading a weight (its own import baseline), MiB",
            {m: peak[IMPORTS[m]] for m in LOADS}),
        "| `get_memory_footprint()` MiB | " + " | ".join(num(fp[m]) for m in LOADS)
        + f" | {fp['nf4'] / fp['bf16']:.2f}x | {fp['nf4_transformers'] / fp['bf16']:.2f}x |",
        row("load + forward, s", {m: [x["seconds"] for x in runs[m]] for m in LOADS}),
        row("at the end: anonymous memory (`RssAnon`), MiB", {m: rss[m, "RssAnon"] for m in LOADS}),
        row("at the end: file-backed pages (`RssFile`: libraries and any mapped checkpoint), MiB",
            {m: rss[m, "RssFile"] for m in LOADS}),
        "",
        MEMORY_MECHANISM,
        "",
        memory_verdict(res, fp),
    ])


def memory_setup(res: dict[str, Any]) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in res["config"].items())
    return (
        f"A Llama with random weights, {res['params'] / 1e9:.2f}B parameters (`LlamaConfig({cfg})`), saved once as "
        "bf16 safetensors shards, then loaded in a fresh subprocess, followed by one forward pass on 8 tokens. "
        "**NF4 (library)**: `vlm_adapters.llm.load_llm`, what `attach(quantization=\"nf4\")` runs (NF4, double "
        "quantization, bf16 compute). **NF4 (transformers)**: `AutoModelForCausalLM.from_pretrained(dir, "
        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
        "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map={\"\": \"cpu\"})`. "
        "**bf16**: the same call with `dtype=torch.bfloat16`. Peak = `ru_maxrss` of that process. The common "
        "import baseline is a subprocess that imports what all three loads import before reading a weight (torch, "
        "transformers, its Llama modeling); every net figure subtracts that one number. The import baselines of the "
        "loads themselves add bitsandbytes (transformers' NF4) and `vlm_adapters.llm` (the library, which imports "
        "bitsandbytes only inside the load, through transformers). Embeddings "
        "and the LM head stay bf16 in every load (bitsandbytes quantizes only the linear layers of the blocks)."
    )


MEMORY_MECHANISM = (
    "transformers maps the safetensors checkpoint into memory. A bf16 model's weights are those mapped pages. "
    "Quantizing on load reads every page of the same bf16 file, and mapped pages count in the process's RSS "
    "until the load ends, so transformers' NF4 load holds the whole bf16 file and the quantized copy at once. "
    "The library hands transformers the same tensors, each mapped on its own and unmapped once quantized "
    "(`_load_quantized_unmapped` in `vlm_adapters/llm.py`): one full-precision tensor is resident at a "
    "time, and the weights it loads are identical (tested). Before each tensor it hands the heap's free pages "
    "back to the OS (glibc `malloc_trim`): the quantization temporaries of one tensor were otherwise left "
    "resident between the small quantized blocks. And it turns off bitsandbytes' CPU repacking of 4-bit "
    "weights, so the forward pass does not allocate a second, repacked copy of every weight."
)


def memory_verdict(res: dict[str, Any], fp: dict[str, float]) -> str:
    peak = {m: statistics.median(v) for m, v in res["peak"].items()}
    raw = statistics.median(res["ratio_raw"]["nf4"])
    allowed = TARGET * peak["bf16"]
    floor = peak["baseline_library"] + fp["nf4"]
    text = (
        f"Target: NF4 raw peak <= {TARGET}x bf16 (library): {raw:.3f}x, {'met' if raw <= TARGET else 'missed'}. "
    )
    if floor > allowed:
        text += (
            f"{TARGET}x would be {allowed:,.0f} MiB. The library's load cannot end below what it imports "
            f"({peak['baseline_library']:,.0f} MiB) plus the quantized model it holds ({fp['nf4']:,.0f} MiB: the 4-bit "
            f"linear layers and the bf16 embeddings and LM head), {floor:,.0f} MiB, already "
            f"{floor / peak['bf16']:.3f}x bf16; its peak is {peak['nf4'] - floor:,.0f} MiB above that floor. "
        )
    return text + (
        f"`ru_maxrss` agreed with the kernel's `VmHWM` of the same process within {num(res['maxrss_vs_hwm_mib'])} "
        "MiB in every run (each child is forked by a small shell: Linux carries `ru_maxrss` across `execve`, so a "
        "child exec'd directly from the benchmark process would report the benchmark's own, larger peak)."
    )
