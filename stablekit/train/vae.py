"""Stage 1: the KL autoencoder, trained for reconstruction with a small KL term (Rombach et al. 2022).

Loss = L1(picture, decode(z)) + kl_weight * KL(q(z|x) || N(0, I)), z sampled from q. No GAN or
perceptual term: the demo data is flat colours and edges, where L1 alone gives sharp results.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..models.vae import AutoencoderKL
from ..images import to_pil
from .common import LossLog, StageConfig, grid, load_state, save_state, set_lr

Batches = Callable[[int], torch.Tensor]  # step -> pictures [B, 3, H, W] in [-1, 1]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def train_vae(vae: AutoencoderKL, batches: Batches, stage: StageConfig, out: Path, *,
              kl_weight: float = 1e-4, preview: Batches | None = None) -> int:
    """Train `vae` in place, resuming from out/vae-state.pt when present; returns the steps done so far."""
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    state_path = out / "vae-state.pt"
    modules = {"vae": vae}
    start = load_state(state_path, modules, optimizer, None) if state_path.exists() else 0
    log = LossLog(out / "vae-log.jsonl", stage)
    generator = torch.Generator().manual_seed(stage.seed)
    vae.train()
    bar = tqdm(range(start, stage.end), initial=start, total=stage.steps, desc="vae", file=sys.stderr)
    for step in bar:
        generator.manual_seed(stage.seed * 1_000_003 + step)  # resumable: the noise depends on the step only
        x = batches(step)
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
        rec = (vae.decode(z) - x).abs().mean()
        kl = kl_divergence(mean, logvar)
        loss = rec + kl_weight * kl
        set_lr(optimizer, stage.lr_at(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % stage.log_every == 0 or step == stage.steps - 1:
            log.write(step, stage.lr_at(step), l1=rec.item(), kl=kl.item())
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        done = step + 1
        if stage.should_save(done):
            save_state(state_path, done, modules, optimizer, None)
        if preview is not None and (done % stage.sample_every == 0 or done == stage.steps):
            _save_reconstructions(vae, preview(0), out / f"vae-{done:06d}.png")
    vae.eval()
    return max(start, stage.end)


@torch.no_grad()
def _save_reconstructions(vae: AutoencoderKL, x: torch.Tensor, path: Path) -> None:
    """Originals on the top row, reconstructions (from the mean) below."""
    was_training = vae.training
    vae.eval()
    rec = vae.decode(vae.encode(x)[0])
    vae.train(was_training)
    both = torch.cat([x, rec]).clamp(-1, 1) * 0.5 + 0.5
    to_pil(grid(both, len(x))[None])[0].save(path)
