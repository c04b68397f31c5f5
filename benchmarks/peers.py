"""The references every StackWise speed is measured beside, in the same process and lease.

- `peak_matmul`: the bf16 matrix-product rate this GPU reaches right now (an 8192^3 product, best
  of several timed runs): MFU is reported against it as well as against the data-sheet figure.
- `hf_layer_stage`: the layer stage a researcher would write with Hugging Face `transformers`
  instead of StackWise: one `LlamaDecoderLayer` (gqa / mha) or `DeepseekV3DecoderLayer` (mla,
  dense MLP) with `attn_implementation="sdpa"`, made bidirectional, then the final RMSNorm and the
  tied head (the frozen embedding matrix), cross-entropy, AdamW. Two variants:
    `hf`       the recipe a user reaches for: the layer as transformers builds it (every weight
               trained), logits on every position and labels -100 off the mask, as
               `LlamaForCausalLM`'s loss takes them (the peer the GPU data-path issue names);
    `hf_same`  the same math as a StackWise layer stage: the SwiGLU up (and the MLA up-projections
               when `mla_freeze_up`) frozen, the head applied to the masked positions only. Only
               the code differs from StackWise's, so its ratio says what the code itself gains.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model.config import ModelConfig


def peak_matmul(device: torch.device, n: int = 8192, iters: int = 20, repeats: int = 5) -> dict[str, Any]:
    """The measured dense bf16 matmul peak (TFLOP/s): best of `repeats` runs of `iters` products."""
    if device.type != "cuda":
        return {"tflops": None, "what": "not measured on CPU"}
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # clocks up, cuBLAS heuristics chosen
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return {"tflops": 2 * n**3 / best / 1e12, "what": f"bf16 {n}x{n} @ {n}x{n}, best of {repeats} x {iters}"}


def hf_config(cfg: ModelConfig, seq_len: int):
    """The peer's one decoder layer (layer 2's kind, tied head) as the package's adapter configures it."""
    from stackwise.hf import StateDictAdapter  # the peer only: StackWise itself does not need transformers

    return StateDictAdapter(cfg).hf_config(
        cfg.kind(2),
        num_hidden_layers=1,
        tie_word_embeddings=True,
        max_position_embeddings=seq_len,
        attn_implementation="sdpa",
    )


class HFLayerStage(nn.Module):
    """One Hugging Face decoder layer + final norm + tied head on masked positions (the peer)."""

    def __init__(self, cfg: ModelConfig, seq_len: int, same_math: bool):
        super().__init__()
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
        from transformers.models.llama import modeling_llama as llama

        mla = cfg.kind(2) == "mla"
        hf_cfg = hf_config(cfg, seq_len)
        lib = ds if mla else llama
        prefix = "DeepseekV3" if mla else "Llama"
        self.layer = getattr(lib, f"{prefix}DecoderLayer")(hf_cfg, layer_idx=0)
        self.layer.self_attn.is_causal = False  # a masked-diffusion denoiser reads both sides
        self.norm = getattr(lib, f"{prefix}RMSNorm")(cfg.d_model, eps=cfg.norm_eps)
        self.rotary = getattr(lib, f"{prefix}RotaryEmbedding")(hf_cfg)
        # stage 1's embedding matrix, frozen in a later stage (the tied head)
        self.register_buffer("embed", torch.empty(cfg.vocab_size, cfg.d_model))
        self.same_math = same_math
        if not same_math:
            return
        self.layer.mlp.up_proj.weight.requires_grad_(False)  # StackWise's frozen random SwiGLU up
        if mla and cfg.mla_freeze_up:
            self.layer.self_attn.q_b_proj.weight.requires_grad_(False)
            self.layer.self_attn.kv_b_proj.weight.requires_grad_(False)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), targets (B, T), mask (B, T) bool -> mean CE over masked positions."""
        B, T, _ = hidden.shape
        position_ids = torch.arange(T, device=hidden.device)[None].expand(B, T)  # (B, T)
        cos_sin = self.rotary(hidden, position_ids)
        h = self.layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        h = self.norm(h)
        if self.same_math:
            logits = F.linear(h[mask], self.embed.to(h.dtype)).float()  # (N, V)
            return F.cross_entropy(logits, targets[mask])
        logits = F.linear(h, self.embed.to(h.dtype)).float()  # (B, T, V), as LlamaForCausalLM upcasts
        labels = targets.masked_fill(~mask, -100)  # (B, T)
        return F.cross_entropy(logits.view(B * T, -1), labels.view(-1), ignore_index=-100)


def hf_layer_stage(
    cfg: ModelConfig,
    B: int,
    T: int,
    device: torch.device,
    steps: int,
    warmup: int,
    amp: bool,
    make_batch,
    same_math: bool,
) -> dict[str, Any]:
    """Time the peer's optimizer step (autocast bf16, grad-norm clip 1.0, AdamW) on a fixed batch."""
    name = "hf_same" if same_math else "hf"
    rec: dict[str, Any] = {"stage": name, "attention": cfg.kind(2), "batch_size": B, "seq_len": T}
    try:
        with torch.device("meta"):
            module = HFLayerStage(cfg, T, same_math)
        module.to_empty(device=device)
        with torch.no_grad():  # speed does not depend on values: N(0, 0.02) matrices, unit norms
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point() and t.ndim >= 2:
                    t.normal_(0.0, 0.02)
                elif t.is_floating_point():
                    t.fill_(1.0)
            module.rotary.inv_freq.copy_(module.rotary.original_inv_freq.to(device))
        batch = make_batch(cfg, "layer", B, T, device, torch.bfloat16 if amp else torch.float32)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)  # torch's default (foreach) AdamW
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

        def step() -> torch.Tensor:
            with ctx():
                loss = module.loss(batch["hidden"], batch["targets"], batch["mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        dt, loss = time_steps(step, warmup, steps, device)
        rec.update(
            step_ms=dt * 1e3,
            tokens_per_s=B * T / dt,
            loss=float(loss),
            trainable_params=sum(p.numel() for p in params),
            steps=steps,
            warmup=warmup,
        )
    except torch.cuda.OutOfMemoryError as e:
        rec.update(oom=True, error=str(e).splitlines()[0][:200])
    except ImportError as e:  # transformers is a dev extra (make install), not a dependency of StackWise
        rec.update(error=f"not measured: {e}")
    finally:
        module = batch = opt = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, Any]:
    """Seconds per call of `step()` over `steps` calls after `warmup` untimed ones (the device
    synchronised at both ends); and the last call's result."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    _sync(device)
    return (time.perf_counter() - t0) / steps, out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
