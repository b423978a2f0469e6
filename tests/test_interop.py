"""What other libraries read of a saved adapter: PEFT loads its LoRA part by itself.

What each test proves:
- plain_peft_loads_the_lora_part: `peft.PeftModel.from_pretrained` on the saved folder restores the trained LoRA
  weights.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vlm_adapters import attach


def test_plain_peft_loads_the_lora_part(tmp_path, llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir, quantization=None)
    model.fit(colours[0], output_dir=str(tmp_path / "run"), max_steps=3, save_strategy="no",
              learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True)
    model.save_pretrained(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(llm_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ours = {n: p for n, p in model.llm.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name])
    assert any(p.abs().sum() > 0 for n, p in theirs.items() if "lora_B" in n)  # trained, not the zero init
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in key for key in saved)
