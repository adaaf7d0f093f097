"""``WeightDiffusion``: the Lightning module that trains a conditional DiT over weight tokens.

Per step (DDPM, Ho et al. 2020): draw t ~ U{0..T-1} and ε ~ N(0, I), form
x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε with diffusers' ``DDPMScheduler.add_noise``, and regress the
denoiser output on ε, x0 or v (``prediction_type``) with an MSE masked to valid token entries.
An optional *functional loss* decodes the clean-weight estimate x̂0 differentiably, runs it in
the task's target network on a small batch of that task's training data and adds the task's
cross-entropy, weighted by ᾱ_t (the estimate is meaningless at high noise), so the generator is
rewarded for weights that work and not only for weights that look close.

EMA weights come from ``torch.optim.swa_utils.AveragedModel`` (a library EMA); they are a
submodule, so Lightning checkpoints and resumes them with the rest of the state.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightdiff.kernels import masked_mse
from weightdiff.models.generator import Generator, sample_tokens
from weightdiff.models.conditioning import ConditionKind
from weightdiff.models.schedule import PredictionType, SamplerName, ScheduleConfig, denoise, predicted_x0



class WeightDiffusion(L.LightningModule):
    """Conditional diffusion over weight tokens.

    Args:
        spec: linked from the datamodule (``data.spec``); never set by hand.
        hidden, depth, heads, mlp_ratio, cross_attention: DiT size.
        condition: condition provider: frozen-MiniLM text (+ numeric features), task code,
            labelled examples, or none (unconditional).
        cond_dropout: probability of replacing a condition by the learned null embedding
            (classifier-free guidance training).
        text_dropout: (text condition) probability of hiding the sentence embedding of a row so
            the parsed numbers must carry the task alone.
        prediction_type, num_train_timesteps, beta_schedule: the diffusers noise schedule.
        functional_loss_weight: weight of the task cross-entropy of the decoded x̂0 (0 = off).
        functional_weighting: per-sample weight of that loss over timesteps: ``"signal"`` = ᾱ_t
            (trust x̂0 in proportion to the signal it carries), ``"uniform"`` = 1 at every t (the
            estimate from pure noise must work too, which is what one-step sampling uses).
        lr, weight_decay, warmup_steps, grad_clip: AdamW with linear warm-up then cosine decay.
        ema_decay: EMA decay of the generator weights.
        val_sampler, val_steps: sampler used by the validation callback and by export defaults.
    """

    def __init__(self, spec: dict[str, Any] | None = None, hidden: int = 256, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, cross_attention: bool = False, condition: ConditionKind = "text",
                 cond_dropout: float = 0.1, text_dropout: float = 0.0, prediction_type: PredictionType = "sample",
                 num_train_timesteps: int = 1000,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2",
                 functional_loss_weight: float = 1.0,
                 functional_weighting: Literal["signal", "uniform"] = "signal", lr: float = 3e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 100, ema_decay: float = 0.995, val_sampler: SamplerName = "ddim",
                 val_steps: int = 20):
        super().__init__()
        if spec is None:
            raise ValueError("WeightDiffusion needs `spec` from the datamodule (link data.spec -> model.spec)")
        self.save_hyperparameters()
        self.schedule = ScheduleConfig(num_train_timesteps, beta_schedule, prediction_type)
        self.generator = Generator(spec, hidden, depth, heads, mlp_ratio, cross_attention, condition, text_dropout)
        self.ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("alphas_cumprod", self.schedule.training_scheduler().alphas_cumprod.float(),
                             persistent=False)
        self.register_buffer("token_length", torch.as_tensor(spec["token_length"], dtype=torch.long),
                             persistent=False)
        self._functional = None  # (tokenizer, target) from the datamodule at setup

    # ----------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and self.hparams.functional_loss_weight > 0:
            self._functional = dm.functional_parts()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.generator.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(self.hparams.warmup_steps, total)

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
            if step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(total - warm, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Update the EMA right after the weights change — before any callback (such as
        # ModelCheckpoint at the end of the batch) can save a state that misses this step.
        self.ema.update_parameters(self.generator)

    # ------------------------------------------------------------------------------------ loss
    def _losses(self, batch: dict[str, Any], cond_dropout: float) -> dict[str, torch.Tensor]:
        x0 = batch["tokens"]  # (B, L, D)
        b, length, d = x0.shape
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(b, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM eq. 4 (as DDPMScheduler.add_noise)
        drop = torch.rand(b, device=x0.device) < cond_dropout
        c = self.generator.embed_condition(batch["cond"], drop)
        out = self.generator(x_t, t, c)
        ptype = self.schedule.prediction_type
        target = {"sample": x0, "epsilon": noise,
                  "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[ptype]
        lengths = self.token_length.repeat(b)
        losses = {"weight": masked_mse(out.reshape(b * length, d), target.reshape(b * length, d), lengths)}
        if self._functional is not None and "fx" in batch:
            tokenizer, target_net = self._functional
            x0_hat = predicted_x0(out, x_t, self.alphas_cumprod[t], ptype)
            params = tokenizer.decode_float(x0_hat)  # name -> (B, *shape), differentiable
            logits = target_net.forward_each(params, batch["fx"])  # (B, n, C)
            ce = F.cross_entropy(logits.flatten(0, 1), batch["fy"].flatten(), reduction="none").view(b, -1)
            w = self.alphas_cumprod[t] if self.hparams.functional_weighting == "signal" else torch.ones_like(ce[:, 0])
            losses["functional"] = (w * ce.mean(1)).sum() / w.sum().clamp_min(1e-8)
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch, self.hparams.cond_dropout)
        loss = losses["weight"] + self.hparams.functional_loss_weight * losses.get("functional", 0.0)
        bs = batch["tokens"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/{k}_loss", v, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        torch.manual_seed(batch_idx)  # fixed noise draws: comparable curves across epochs
        losses = self._losses(batch, cond_dropout=0.0)
        bs = batch["tokens"].shape[0]
        for k, v in losses.items():
            self.log(f"val/{k}_loss", v, batch_size=bs, sync_dist=True, prog_bar=(k == "weight"))

    # -------------------------------------------------------------------------------- sampling
    def generate(self, raw_cond: Any, num: int, *, steps: int | None = None, sampler: SamplerName | None = None,
                 guidance: float = 1.0, generator: torch.Generator | None = None, use_ema: bool = True) -> torch.Tensor:
        """Sample ``num`` token sets per condition row. Returns (num_conditions * num, L, D)."""
        net = self.ema.module if use_ema else self.generator
        return sample_tokens(net, raw_cond, num, self.schedule, token_size=self.hparams.spec["token_size"],
                             num_tokens=len(self.hparams.spec["token_length"]), steps=steps or self.hparams.val_steps,
                             sampler=sampler or self.hparams.val_sampler, guidance=guidance, generator=generator)
