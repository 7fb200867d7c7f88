"""`stablekit train ...`: the demo model from scratch, or a checkpoint fine-tuned (whole, or a LoRA) on pictures."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train the shapes demo model, or fine-tune a checkpoint")
    stages = t.add_subparsers(dest="train_command", required=True)

    demo = stages.add_parser("demo", help="train the shapes demo model from scratch (about an hour on 2 CPU cores)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"),
                      help="run folder: states (resumable), loss logs, sample grids, the exported checkpoint")
    demo.add_argument("--vae-steps", type=int, default=None, help="optimiser steps of the VAE stage")
    demo.add_argument("--steps", type=int, default=None, help="optimiser steps of the diffusion stage")
    demo.add_argument("--pool", type=int, default=None, help="training pictures encoded for the diffusion stage")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")

    ft = stages.add_parser("finetune", help="fine-tune a checkpoint's UNet on pictures with .txt captions")
    _add_data_args(ft, "OUT/finetuned.safetensors", lr=1e-5, caption_dropout=0.1)
    ft.add_argument("--train-text-encoder", action="store_true")

    lora = stages.add_parser("lora", help="train a LoRA (kohya .safetensors) on pictures with .txt captions")
    _add_data_args(lora, "OUT/NAME.safetensors (NAME: --name, else the folder's name)", lr=1e-4)
    lora.add_argument("--rank", type=int, default=8, help="the LoRA's dimension (kohya's network_dim)")
    lora.add_argument("--alpha", type=float, default=None,
                      help="scale numerator: the branches add alpha/rank times their output (default: rank)")
    lora.add_argument("--text-encoder", action="store_true", help="also train the text encoder's branches (SD 1.x)")
    lora.add_argument("--conv-rank", type=int, default=None,
                      help="also train the ResBlocks and resampling convs, the 3x3 ones at this rank "
                           "(LoCon; kohya's conv_dim)")
    lora.add_argument("--conv-alpha", type=float, default=None, help="the 3x3 convs' alpha (default: --conv-rank)")
    lora.add_argument("--name", default=None, help="the file's name and its ss_output_name")
    lora.add_argument("--peft", action="store_true",
                      help="also write a diffusers/PEFT copy, OUT/pytorch_lora_weights.safetensors")

    db = stages.add_parser("dreambooth", help="DreamBooth: a subject from a few pictures, with prior preservation")
    _add_run_args(db, "OUT/dreambooth.safetensors", lr=None, steps=400, lr_help="default 5e-6, or 1e-4 with --lora")
    db.add_argument("--instance-data", type=Path, required=True, help="folder of the subject's pictures")
    db.add_argument("--instance-prompt", required=True, help='their caption, e.g. "a photo of sks dog"')
    db.add_argument("--class-prompt", default=None, help='prior preservation\'s prompt, e.g. "a photo of dog"')
    db.add_argument("--class-data", type=Path, default=None,
                    help="class pictures; topped up by the model itself (default folder: OUT/class-pictures)")
    db.add_argument("--num-class-images", type=int, default=100)
    db.add_argument("--prior-loss-weight", type=float, default=1.0)
    db.add_argument("--train-text-encoder", action="store_true")
    db.add_argument("--lora", action="store_true", help="train LoRA branches and write a kohya file")
    db.add_argument("--rank", type=int, default=8)
    db.add_argument("--alpha", type=float, default=None)

    emb = stages.add_parser("embedding", help="textual inversion: new vectors for a token (the web UI's .safetensors)")
    _add_data_args(emb, "OUT/TOKEN.safetensors", lr=5e-3)
    emb.add_argument("--token", required=True, help="the trigger word; every caption must contain it")
    emb.add_argument("--init-word", default="*", help="the vectors start from this word's token embeddings")
    emb.add_argument("--vectors", type=int, default=1, help="vectors per token")


def _add_run_args(p: argparse.ArgumentParser, result: str, lr: float | None, steps: int = 1000,
                  lr_help: str | None = None) -> None:
    """What every fine-tuning command takes: the model, the run folder, the optimiser, the device, memory."""
    p.add_argument("--model", "-m", required=True, help="checkpoint file, diffusers folder or hub repo id")
    p.add_argument("--out", type=Path, required=True, help=f"run folder (resumable); the result is {result}")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--size", type=int, default=None, help="training picture size (default: the model's resolution)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type (weights cannot tell)")
    _add_memory_args(p)


def _add_data_args(p: argparse.ArgumentParser, result: str, lr: float, caption_dropout: float = 0.0) -> None:
    """The run arguments, and a captioned picture folder with its options."""
    _add_run_args(p, result, lr)
    p.add_argument("--data", type=Path, required=True,
                   help="folder of pictures, each with a same-name .txt caption (a.png + a.txt)")
    p.add_argument("--caption-dropout", type=float, default=caption_dropout,
                   help="probability of training a picture with an empty caption")
    p.add_argument("--flip", action="store_true", help="mirror pictures left-right at random")
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets of about --size squared pixels instead of square crops")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights (0: none), e.g. 0.999")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet blocks' activations in the backward pass: less memory, more time")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the forward passes (weights stay float32); fp16 is for CUDA")


def _data_options(args: argparse.Namespace) -> dict:
    if not 0 <= args.caption_dropout <= 1:
        raise ValueError(f"--caption-dropout must be between 0 and 1, got {args.caption_dropout}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema must be at least 0 and below 1, got {args.ema}")
    return {"caption_dropout": args.caption_dropout, "flip": args.flip, "buckets": args.buckets, "ema": args.ema,
            **_memory_options(args)}


def _memory_options(args: argparse.Namespace) -> dict:
    import torch

    dtypes = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return {"gradient_checkpointing": args.gradient_checkpointing, "autocast": dtypes[args.mixed_precision]}


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("vae_steps", "steps", "pool", "threads", "batch_size", "size", "rank", "num_class_images"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "lr", None) is not None and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.train_command == "demo":
        from .demo import Recipe, train_demo

        recipe = Recipe()
        if args.vae_steps:
            recipe = replace(recipe, vae=replace(recipe.vae, steps=args.vae_steps))
        if args.steps:
            recipe = replace(recipe, diffusion=replace(recipe.diffusion, steps=args.steps))
        if args.pool:
            recipe = replace(recipe, pool=args.pool)
        path = train_demo(args.out, recipe)
    elif args.train_command == "dreambooth":
        from .dreambooth import train_dreambooth

        path = train_dreambooth(
            args.model, args.instance_data, args.instance_prompt, args.out, steps=args.steps,
            batch_size=args.batch_size, lr=(1e-4 if args.lora else 5e-6) if args.lr is None else args.lr,
            size=args.size,
            class_prompt=args.class_prompt, class_data=args.class_data, num_class_images=args.num_class_images,
            prior_loss_weight=args.prior_loss_weight, train_text_encoder=args.train_text_encoder, lora=args.lora,
            rank=args.rank, alpha=args.alpha, device=args.device, prediction=args.prediction, **_memory_options(args))
    elif args.train_command == "embedding":
        from .embedding import train_embedding

        path = train_embedding(args.model, args.data, args.out, args.token, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, vectors=args.vectors,
                               init_word=args.init_word, size=args.size, device=args.device,
                               prediction=args.prediction, **_data_options(args))
    elif args.train_command == "lora":
        from .lora import train_lora

        path = train_lora(args.model, args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          rank=args.rank, alpha=args.alpha, size=args.size, text_encoder=args.text_encoder,
                          device=args.device, prediction=args.prediction, name=args.name, peft=args.peft,
                          conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
                          **_data_options(args))
    else:
        from .finetune import finetune

        path = finetune(args.model, args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        size=args.size, train_text_encoder=args.train_text_encoder, device=args.device,
                        prediction=args.prediction, **_data_options(args))
    if path is None:
        print(f"stablekit: stopped early; run the same command again to resume from {args.out}", file=sys.stderr)
        return 0
    print(path)
    return 0
