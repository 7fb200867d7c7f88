"""The demo-model proof of the training commands, shortened for CI (the full run: python -m
stablekit.demo.proof, 20 seeds, figures in the README): a new word is learned by a LoRA and
by DreamBooth, and used through <lora:...> tags, while the prompts seen in training keep their colours."""

from __future__ import annotations

from stablekit.demo.proof import prove


def test_the_demo_model_learns_zorp_with_lora_and_dreambooth(tmp_path):
    rates = prove(tmp_path, steps=300, seeds=10, num_class_images=16)
    before, lora, dreambooth = rates["before"], rates["zorp"], rates["zorp-db"]
    print(f"\n[zorp] orange: before {before.orange:.0%}, LoRA {lora.orange:.0%}, DreamBooth {dreambooth.orange:.0%}; "
          f"seen colours {before.seen_colours:.0%} -> {lora.seen_colours:.0%} / {dreambooth.seen_colours:.0%}")
    assert before.orange <= 0.2
    assert lora.orange >= 0.7 and dreambooth.orange >= 0.6
    assert min(lora.seen_colours, dreambooth.seen_colours) >= 0.8 and before.seen_colours >= 0.9
