"""Stage 2: latent diffusion (Ho et al. 2020 objective in the VAE's latent space, Rombach et al. 2022).

Per step: t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, loss = |eps - unet(x_t, t, text)|^2,
with the model's own discrete schedule. Captions are dropped to "" with probability
`caption_dropout`, so one network learns the conditional and the unconditional prediction that
classifier-free guidance combines. `offset_noise` adds a per-channel constant to eps (Guttenberg
2023), which lets the model change a picture's overall colour: the SD schedule's last step keeps
a little signal, so without it the mean colour would follow the starting noise.

Symbols: a_t = alphas_cumprod[t]; eps = noise; x0 = scaled latent of the picture.
"""

from __future__ import annotations

import random
import sys
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..diffusion.cond import Cond
from ..diffusion.schedule import ModelSchedule
from ..images import to_pil
from ..models import StableDiffusionModel
from ..models.tokenizer import CLIPTokenizer
from ..params import GenerationParams
from .common import EMA, LossLog, StageConfig, checkpointed, grid, load_state, plot_losses, save_state, set_lr

# step -> (scaled latents [B,4,h,w], captions) or (latents, captions, weights [B]): with weights the loss
# is sum_i w_i * mse_i (per-sample MSE), as DreamBooth's prior preservation weighs its two halves
Batches = Callable[[int], tuple]


def train_latent_diffusion(
    model: StableDiffusionModel, batches: Batches, stage: StageConfig, out: Path, *,
    caption_dropout: float = 0.1, offset_noise: float = 0.1, train_text_encoder: bool = True,
    preview_prompts: list[str] | None = None, preview_size: tuple[int, int] = (64, 64),
    device: torch.device = torch.device("cpu"), trained: dict[str, nn.Module] | None = None,
    encode_captions: Callable[[list[str]], torch.Tensor] | None = None,
    gradient_checkpointing: bool = False, autocast: torch.dtype | None = None,
) -> int:
    """Train the UNet (and the text encoder) of `model` in place; returns the steps done so far.

    `trained`: the modules whose parameters learn (default: the UNet, and the text encoder when
    `train_text_encoder`); LoRA passes its branches, which the model's layers call.
    `encode_captions`: captions -> text context (default: tokenized and encoded by the model's text
    encoder); textual inversion passes one that puts its learned vectors in.
    `gradient_checkpointing` recomputes the UNet blocks' activations in the backward pass;
    `autocast` (bf16 or fp16) runs the forward passes in that precision (the weights stay float32).

    When all steps are done and EMA is on, the model is left holding the averaged weights.

    Resumes from out/diffusion-state.pt when present. The VAE is not touched. Randomness is drawn on
    the CPU (a run is the same on any device) and moved to `device`, where the model must already be.
    """
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(pad_id=model.cfg.text.pad_id)
    schedule = ModelSchedule(model.cfg.schedule)
    alphas = schedule.alphas_cumprod.float().to(device)  # [T]
    if trained is None:
        trained = {"unet": model.unet} | ({"text": model.text_encoder} if train_text_encoder else {})
    params = [p for m in trained.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    ema = EMA(params, stage.ema) if stage.ema else None
    state_path = out / "diffusion-state.pt"
    start = load_state(state_path, trained, optimizer, ema) if state_path.exists() else 0
    log = LossLog(out / "diffusion-log.jsonl", stage)
    generator = torch.Generator()
    for m in trained.values():
        m.train()
    blocks = [*model.unet.input_blocks, model.unet.middle_block, *model.unet.output_blocks]
    recompute = checkpointed(blocks) if gradient_checkpointing else contextlib.nullcontext()
    bar = tqdm(range(start, stage.end), initial=start, total=stage.steps, desc="diffusion", file=sys.stderr)
    with recompute:
        for step in bar:
            generator.manual_seed(stage.seed * 1_000_003 + step)  # resumable: randomness depends on the step
            rng = random.Random(stage.seed * 1_000_003 + step)
            x0, captions, *weights = batches(step)
            x0 = x0.to(device)
            b = x0.shape[0]
            captions = ["" if rng.random() < caption_dropout else c for c in captions]
            t = torch.randint(0, len(alphas), (b,), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            if offset_noise:
                eps = eps + offset_noise * torch.randn((b, x0.shape[1], 1, 1), generator=generator)
            t, eps = t.to(device), eps.to(device)
            a = alphas[t].view(b, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if encode_captions is not None:
                    context = encode_captions(captions)
                else:
                    context = model.text_encoder(tokenizer(captions).to(device))
                prediction = model.unet(x_t, t.float(), Cond(context)).float()
            if weights:
                per_sample = F.mse_loss(prediction, eps, reduction="none").mean(dim=(1, 2, 3))
                loss = (per_sample * weights[0].to(device)).sum()
            else:
                loss = F.mse_loss(prediction, eps)
            set_lr(optimizer, stage.lr_at(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if ema is not None:
                ema.update(step)
            if step % stage.log_every == 0 or step == stage.steps - 1:
                log.write(step, stage.lr_at(step), mse=loss.item())
                bar.set_postfix(mse=f"{loss.item():.4f}")
            done = step + 1
            if stage.should_save(done):
                save_state(state_path, done, trained, optimizer, ema)
            if preview_prompts and (done % stage.sample_every == 0 or done == stage.steps):
                with _averaged(ema):
                    save_samples(model, preview_prompts, out / f"samples-{done:06d}.png", preview_size,
                                 device=device)
    for m in trained.values():
        m.eval()
    plot_losses(log.path, out / "diffusion-loss.png")
    done = max(start, stage.end)
    if ema is not None and done == stage.steps:  # the result is the averaged weights
        ema.swap()
    for p in params:
        p.requires_grad_(False)
    return done


@contextmanager
def _averaged(ema: EMA | None) -> Iterator[None]:
    """The EMA weights are live inside this context."""
    if ema:
        ema.swap()
    try:
        yield
    finally:
        if ema:
            ema.swap()


@torch.no_grad()
def save_samples(model: StableDiffusionModel, prompts: list[str], path: Path, size: tuple[int, int],
                 seeds: int = 4, device: torch.device = torch.device("cpu")) -> None:
    """A grid through the real pipeline: one row per prompt, `seeds` columns (DPM++ 2M, 20 steps, CFG 7)."""
    from ..pipeline.conditioning import TaskContext
    from ..pipeline.tasks import run_task
    from ..task_table import TASKS

    was = {m: m.training for m in (model.unet, model.text_encoder)}
    for m in was:
        m.eval()
    ctx = TaskContext(model, CLIPTokenizer(pad_id=model.cfg.text.pad_id), ModelSchedule(model.cfg.schedule),
                      device, torch.float32)
    rows = []
    for prompt in prompts:
        p = GenerationParams(prompt=prompt, width=size[0], height=size[1], steps=20, seed=0,
                             batch_size=seeds).validated()
        rows.append(run_task(ctx, TASKS["txt2img"], p, {})[0])
    for m, training in was.items():
        m.train(training)
    to_pil(grid(torch.cat(rows), seeds)[None])[0].save(path)
