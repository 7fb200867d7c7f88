"""The demo-model proof of the training commands, shortened for CI (the full run: python -m
stablekit.demo.proof, 20 seeds, figures in the README): a new word is learned by a LoRA and
by DreamBooth, and used through <lora:...> tags, while the prompts seen in training keep their colours."""

from __future__ import annotations

from stablekit.demo import demo_model
from stablekit.demo.analyse import describe
from stablekit.demo.proof import WORD_PROMPT, prove

from .server_support import Server, from_b64


def test_the_demo_model_learns_zorp_with_lora_and_dreambooth(tmp_path):
    rates = prove(tmp_path, steps=300, seeds=10, num_class_images=16)
    before, lora, dreambooth = rates["before"], rates["zorp"], rates["zorp-db"]
    print(f"\n[zorp] orange: before {before.orange:.0%}, LoRA {lora.orange:.0%}, DreamBooth {dreambooth.orange:.0%}; "
          f"seen colours {before.seen_colours:.0%} -> {lora.seen_colours:.0%} / {dreambooth.seen_colours:.0%}")
    assert before.orange <= 0.2
    assert lora.orange >= 0.7 and dreambooth.orange >= 0.6
    assert min(lora.seen_colours, dreambooth.seen_colours) >= 0.8 and before.seen_colours >= 0.9

    # the same LoRA file through the web-UI API, as a prompt tag (8 pictures: the server's default batch limit)
    server = Server(demo_model(), tmp_path, "--lora-dir", str(tmp_path / "loras"), env={"OMP_NUM_THREADS": "1"})
    try:
        status, body, _ = server.request("POST", "/sdapi/v1/txt2img", {
            "prompt": WORD_PROMPT + " <lora:zorp:1>", "seed": 2000, "batch_size": 8, "steps": 20,
            "width": 64, "height": 64, "sampler_name": "DPM++ 2M"})
    finally:
        server.stop()
    assert status == 200, body
    orange = sum(describe(from_b64(im)).foreground == "orange" for im in body["images"]) / 8
    print(f"[zorp] through /sdapi/v1/txt2img with <lora:zorp:1>: orange {orange:.0%}")
    assert orange >= 0.7
