"""The weight change of one LoRA / LyCORIS module, computed as the AUTOMATIC1111 web UI does.

File tensors -> symbols (shapes for a layer with weight W [out, in(, kh, kw)], rank r):
  up   lora_up.weight   (PEFT lora_B)  [out, r(, 1, 1)]      down lora_down.weight (PEFT lora_A) [r, in(, kh, kw)]
  mid  lora_mid.weight  CP core [r, r, kh, kw]  (LoCon with CP decomposition; `down` and `up` are then 1x1)
  LoHa hada_w1_a [out, r] / hada_w1_b [r, in*kh*kw], the same for w2; with hada_t1/t2 [r, r, kh, kw] the
       a-factors are stored transposed, [r, out], and the b-factors are [r, in]
  LoKr lokr_w1 [a, b] (or lokr_w1_a @ lokr_w1_b), lokr_w2 [c, d(, kh, kw)] (or lokr_w2_a @ lokr_w2_b, or
       CP(lokr_t2, lokr_w2_a, lokr_w2_b)), with a*c = out and b*d = in

  LoRA      dW = up @ down                                  (Hu et al. 2021, "LoRA")
  LoCon-CP  dW[i,j,k,l] = sum_nm mid[n,m,k,l] up[i,n] down[m,j]
  LoHa      dW = (w1a @ w1b) * (w2a @ w2b), elementwise     (Hyeon-Woo et al. 2022, "FedPara")
  LoKr      dW = kron(w1, w2)                               (Yeh et al. 2023, LyCORIS)
  CP(t, a, b)[o,i,k,l] = sum_pq t[p,q,k,l] a[p,o] b[q,i]

Each is multiplied by `scale` = the file's `scale`, else alpha / rank where the file stores alpha,
else 1.0: a file without alpha is not divided by its rank. A full-matrix LoKr has no rank, so it
ignores alpha. All arithmetic is float32 whatever the file's dtype (kohya files are often fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch

Kind = Literal["lora", "loha", "lokr"]

# File suffix -> (adapter kind, our name for the tensor). PEFT's lora_A / lora_B are down / up.
SUFFIXES: dict[str, tuple[Kind, str]] = {
    "lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"), "lora_mid.weight": ("lora", "mid"),
    "lora_B.weight": ("lora", "up"), "lora_A.weight": ("lora", "down"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"), "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"),
}
SCALARS = ("alpha", "scale")  # per-module numbers stored next to the factors


@dataclass(frozen=True)
class AdapterModule:
    """One adapted layer of a LoRA file: its factors, keyed by the short names above."""

    name: str  # the module name as written in the file, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    kind: Kind
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    scale_key: float | None = None  # an explicit `scale` in the file wins over alpha / rank

    @property
    def part(self) -> Literal["te", "unet"]:
        """Which multiplier applies: the text encoder's or the UNet's."""
        return "te" if self.name.startswith(("lora_te", "text_encoder")) else "unet"

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["w1b"].shape[0]
        # LoKr: only a low-rank factor has a rank (w2's wins, as in the web UI)
        low = t.get("w2b", t.get("w1b"))
        return None if low is None else low.shape[0]

    @property
    def scale(self) -> float:
        if self.scale_key is not None:
            return self.scale_key
        if self.alpha is not None and self.rank is not None:
            return self.alpha / self.rank
        return 1.0

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale * dW in float32, in the factors' own layout ([out, in] or [out, in, kh, kw])."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        rebuilt = {"lora": _lora, "loha": _loha, "lokr": _lokr}[self.kind](t)
        return rebuilt * self.scale

    def delta_shape(self) -> torch.Size:
        """The shape `delta` would have, computed on the meta device (no memory, no arithmetic)."""
        return self.delta("meta").shape


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CP / Tucker rebuild: core t [p, q, kh, kw], a [p, out], b [q, in] -> [out, in, kh, kw]."""
    return torch.einsum("pqkl,po,qi->oikl", t, a, b)


def _lora(t: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = _flat(t["up"]), _flat(t["down"])  # [out, r], [r, in*kh*kw]
    if "mid" in t:
        return torch.einsum("nmkl,in,mj->ijkl", t["mid"], up, down)  # [out, in, kh, kw]
    return (up @ down).reshape(up.shape[0], *t["down"].shape[1:])  # a 3x3 down carries the kernel


def _loha(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "t1" in t:
        first = _cp(t["t1"], t["w1a"], _flat(t["w1b"]))
    else:
        first = (t["w1a"] @ _flat(t["w1b"])).reshape(t["w1a"].shape[0], *t["w1b"].shape[1:])
    second = _cp(t["t2"], t["w2a"], _flat(t["w2b"])) if "t2" in t else t["w2a"] @ _flat(t["w2b"])
    return first * second.reshape(first.shape)


def _lokr(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = t["w1"] if "w1" in t else t["w1a"] @ _flat(t["w1b"])
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = _cp(t["t2"], t["w2a"], t["w2b"])
    else:
        w2 = t["w2a"] @ _flat(t["w2b"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]  # the kernel lives in w2 only
    return torch.kron(w1.contiguous(), w2.contiguous())  # kron's reshape needs dense inputs (meta too)


def fit(delta: torch.Tensor | torch.Size, weight: torch.Size) -> tuple[int, ...] | None:
    """The shape to view `delta` in before adding it to a weight of shape `weight`; None if it does not fit.

    The output size must agree and the rest must hold as many numbers (so a [out, in] delta fits a 1x1
    conv [out, in, 1, 1], and a [out, in*9] LoHa factor a 3x3 conv). The one exception, as in the web UI:
    a 4-channel delta on a 9-channel inpainting `input_blocks.0.0` (see `pad_to`).
    """
    shape = tuple(delta.shape if isinstance(delta, torch.Tensor) else delta)
    if not shape or shape[0] != weight[0]:
        return None
    if math.prod(shape) == math.prod(weight):
        return tuple(weight)
    if len(weight) == 4 and weight[1] == 9 and math.prod(shape) * 9 == math.prod(weight) * 4:
        return (weight[0], 4, *weight[2:])
    return None


def pad_to(delta: torch.Tensor, weight: torch.Size) -> torch.Tensor:
    """Zero-pad a 4-input-channel delta to the inpainting UNet's 9 (mask and masked-image channels stay)."""
    if delta.shape[1] == weight[1]:
        return delta
    return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, weight[1] - delta.shape[1]))
