"""``WeightDiffusion``: the Lightning module that trains a conditional DiT over weight tokens.

Per step (DDPM, Ho et al. 2020): draw t ~ U{0..T-1} and ε ~ N(0, I), form
x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε with diffusers' ``DDPMScheduler.add_noise``, and regress the
denoiser output on ε, x0 or v (``prediction_type``) with an MSE masked to valid token entries.
With ``objective="flow_matching"`` (rectified flow, Liu et al. 2023) σ ~ U[0, 1) instead,
x_σ = (1 - σ) x0 + σ ε, the denoiser sees the timestep σ · T and regresses the velocity ε - x0
(``flow_prediction``) or x0.
An optional *functional loss* decodes the clean-weight estimate x̂0 differentiably, runs it in
the task's target network on a small batch of that task's training data and adds the task's
cross-entropy, weighted by the signal share (ᾱ_t under DDPM; the estimate is meaningless at high
noise), so the generator is rewarded for weights that work and not only for weights that look close.

EMA weights come from ``torch.optim.swa_utils.AveragedModel`` (a library EMA); they are a
submodule, so Lightning checkpoints and resumes them with the rest of the state. The learning rate
warms up linearly and then follows a cosine to 10 % (torch's ``LinearLR`` then ``CosineAnnealingLR``).

At fit start the datamodule's fitted tokenizer is also written to the run folder
(``<run>/tokenizer/``, beside ``checkpoints/``); every checkpoint carries it too (see
:mod:`weightdiff.training.datamodule`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weightdiff.kernels import masked_mse
from weightdiff.models.conditioning import ConditionKind
from weightdiff.models.generator import TOKENIZER_DIR, WeightGenerator, sample_tokens
from weightdiff.models.windows import window_tokens
from weightdiff.errors import WeightDiffError
from weightdiff.training.objectives import LossWeighting, loss_weight, sample_sigmas, sample_timesteps, sampler_states
from weightdiff.models.schedule import (DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SAMPLERS, BetaSchedule, NoiseLevel,
                                        Objective, PredictionType, SamplerName, ScheduleConfig, predicted_x0)

#: The learning rate decays to this fraction of its peak.
MIN_LR_FACTOR = 0.1


def mean_input_fitted(hparams: Any) -> bool:
    """True when a module's conditional mean reads the raw condition, standardised at fit start."""
    return hparams.get("mean_head", 0) > 0 and hparams.get("mean_input", "embedding") != "embedding"


def latent_config(hparams: Any) -> dict[str, Any] | None:
    """The :class:`~weightdiff.models.autoencoder.WeightAutoencoder` arguments of a module's
    hyper-parameters, or None when it diffuses weight tokens (``latent_tokens`` 0 or absent)."""
    if not hparams.get("latent_tokens", 0):
        return None
    return {"num_params": int(sum(hparams["spec"]["token_length"])), "latent_tokens": hparams["latent_tokens"],
            "latent_dim": hparams["latent_dim"], "width": hparams["autoencoder_width"],
            "basis": hparams["autoencoder_basis"], "input_noise": hparams["autoencoder_input_noise"],
            "latent_noise": hparams["autoencoder_latent_noise"]}


def build_generator(spec: dict[str, Any], hidden: int, depth: int, heads: int, mlp_ratio: float,
                    cross_attention: bool, condition: ConditionKind, text_dropout: float = 0.0,
                    latent: dict[str, Any] | None = None, window: int | None = None,
                    center: bool = False, mean_head: int = 0, mean_input: str = "embedding") -> WeightGenerator:
    """The :class:`WeightGenerator` for a datamodule ``spec`` (sizes and the layout's per-token ids);
    ``latent``: its autoencoder's arguments (:func:`latent_config`); ``window``: its attention window."""
    ids = spec["token_ids"]
    return WeightGenerator(
        token_size=spec["token_size"], num_tokens=len(spec["token_length"]), num_tensors=spec["num_tensors"],
        max_chunks=spec["max_chunks"], max_depth=spec["max_depth"], num_kinds=spec["num_kinds"],
        condition=condition, condition_dims=dict(spec["condition_dims"]), hidden=hidden, depth=depth, heads=heads,
        mlp_ratio=mlp_ratio, cross_attention=cross_attention, text_dropout=text_dropout, latent=latent,
        window=window, center=center, mean_head=mean_head, mean_input=mean_input,
        token_layout={**ids, "length": spec["token_length"]})


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_factor: float = MIN_LR_FACTOR) -> LRScheduler:
    """Per-step schedule: lr · (step + 1) / warm for the first ``warm`` steps, then a cosine from lr to
    ``min_factor`` · lr at ``total_steps`` (SGDR, Loshchilov & Hutter 2017, without restarts)."""
    warm = min(warmup_steps, total_steps)
    lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warm, 1), eta_min=min_factor * lr)
    if warm == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=max(warm - 1, 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warm])


def two_phase_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, first_steps: int, total_steps: int,
                       first_factor: float = 1.0, min_factor: float = MIN_LR_FACTOR) -> LRScheduler:
    """Warm-up then cosine (as :func:`warmup_cosine`) over the first ``first_steps`` steps at
    ``first_factor`` · lr, then again over the rest at lr: one schedule per training phase."""
    def cosine(step: int, steps: int) -> float:
        warm = min(warmup_steps, steps)
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(steps - warm, 1)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def factor(step: int) -> float:
        if step < first_steps:
            return first_factor * cosine(step, first_steps)
        return cosine(step - first_steps, max(total_steps - first_steps, 1))

    return LambdaLR(optimizer, factor)


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: where ``checkpoints/`` goes (the logger's version folder), else the log/root dir."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        return Path(ckpt.dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)


def schedule_of(hparams: Any) -> ScheduleConfig:
    """The :class:`ScheduleConfig` of a module's hyper-parameters (``objective`` and ``flow_shift``
    default to DDPM's for checkpoints saved without them).

    Raises:
        WeightDiffError: an option that does not apply to the objective, naming it.
    """
    objective = hparams.get("objective", "ddpm")
    try:
        return ScheduleConfig(hparams["num_train_timesteps"], hparams["beta_schedule"], hparams["prediction_type"],
                              objective, hparams.get("flow_shift", 1.0))
    except ValueError as exc:
        raise WeightDiffError(f"model options (--model.objective {objective}): {exc}") from None


class WeightDiffusion(L.LightningModule):
    """Conditional diffusion over weight tokens.

    Args:
        spec: linked from the datamodule (``data.spec``); never set by hand.
        hidden, depth, heads, mlp_ratio, cross_attention: DiT size.
        condition: condition provider: frozen-MiniLM text (+ numeric features), task code,
            labelled examples, unlabelled inputs of the task, or none (unconditional).
        cond_dropout: probability of replacing a condition by the learned null embedding
            (classifier-free guidance training).
        text_dropout: (text condition) probability of hiding the sentence embedding of a row so
            the parsed numbers must carry the task alone.
        prediction_type, num_train_timesteps, beta_schedule: the diffusers noise schedule
            (``prediction_type`` ``flow_prediction`` or ``sample`` for flow matching).
        objective: ``"ddpm"`` or ``"flow_matching"`` (rectified flow; see
            :mod:`weightdiff.models.schedule`).
        flow_shift: (flow_matching) the Euler sampler's σ shift (FlowMatchEulerDiscreteScheduler's ``shift``).
        functional_loss_weight: weight of the task cross-entropy of the decoded x̂0 (0 = off).
        functional_weighting: per-sample weight of that loss over timesteps: ``"signal"`` = ᾱ_t, in
            general the signal share a_t² / (a_t² + s_t²) (trust x̂0 in proportion to the signal it
            carries), ``"uniform"`` = 1 at every t (the estimate from pure noise must work too, which
            is what one-step sampling uses).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 10 %. The
            module is the one owner of its optimizer and schedule: ``weightdiff fit`` has no
            ``--optimizer`` / ``--lr_scheduler`` options that would replace them.
        ema_decay: EMA decay of the generator weights.
        sampler, num_inference_steps: the generator's sampler (None: the objective's default, ``ddim``
            or ``euler``): used by the validation callback and exported as the default of
            ``weightdiff sample`` and the pipeline.
        sampling_latent_noise: (latent diffusion) std of the Gaussian noise added to each sampled
            latent before decoding, exported as the generator's default (0 = off; the latent has
            unit std over the zoo). The decoder is trained on latents with ``autoencoder_latent_noise``
            and the task loss, so it maps a neighbourhood of each latent to working weights.
        loss_weighting, min_snr_gamma: weight of the denoising loss over noise levels (``"min_snr"``:
            Min-SNR-γ; see :mod:`weightdiff.training.objectives`).
        timestep_shift: training noise levels (t, or σ for flow matching) drawn after the shift
            u' = s·u / (1 + (s − 1)·u) (s > 1: more high-noise steps; 1: uniform).
        path_functional_weight, path_rows: weight of the task cross-entropy of x̂0 on states the
            generator's own sampler (``sampler``, ``num_inference_steps``) visits from noise, computed
            on the first ``path_rows`` rows of each batch at a random step of the path (0 = off).
        latent_tokens, latent_dim: latent diffusion (:mod:`weightdiff.models.autoencoder`): the DiT
            diffuses ``latent_tokens`` tokens of ``latent_dim`` entries, decoded to weights by a
            weight autoencoder trained first, in the same run (0 = off: the DiT diffuses weight tokens).
        autoencoder_steps: the autoencoder's training steps, at the start of the run; the diffusion
            gets the remaining ``max_steps - autoencoder_steps``, with the autoencoder frozen.
        autoencoder_mse_steps: of those, the first steps train on the weight MSE alone; the rest add
            the functional loss of weights decoded from noised latents, weighted by
            ``autoencoder_functional_weight`` (``functional_loss_weight`` weights the diffusion's).
        autoencoder_lr: the autoencoder's peak learning rate (warm-up and cosine of its own).
        autoencoder_width, autoencoder_basis, autoencoder_input_noise, autoencoder_latent_noise:
            the autoencoder's MLP width, number of principal directions and training noise stds.
        noise_draws: noise levels and noises drawn per entry and step (the batch is each entry
            repeated this many times): cheap in a latent, where the DiT sees a few tokens.
        window: the DiT attends within windows of this many weight tokens
            (:mod:`weightdiff.models.windows`): targets too long for one sequence.
        train_windows: with ``window``, fit this many random windows per step (the same for every
            row of the batch) instead of all of them; the functional loss then runs the entry's
            own network with those windows replaced by their clean estimate. 0: every window.
        center_tokens: diffuse each token's residual from the training tokens' mean, scaled per
            tensor (:meth:`~weightdiff.models.generator.WeightGenerator.fit_center`, set at the start
            of fitting and saved with the generator): for zoos of one basin, whose networks share most
            of their weights.
        mean_head: width of the generator's conditional mean μ(c) (0: none; see
            :class:`~weightdiff.models.generator.WeightGenerator`): trained as a hypernetwork on the
            weight MSE and, with ``functional_loss_weight``, the task loss; the DiT diffuses the
            residual from it (μ is held fixed in the DiT's losses).
        mean_input: what μ reads: ``"embedding"`` (the condition provider's vector), ``"raw"`` (the
            raw text or code condition, standardised by the training conditions') or ``"numeric"``
            (of a text condition, only the numbers parsed from the description, standardised).
        mean_functional_weight: (mean head) weight of μ's task loss (None: ``functional_loss_weight``,
            which then weights the DiT's only): a hypernetwork-strength task loss on μ beside a
            smaller one on the diffused residual lets the DiT stay a denoiser at low noise.
        mean_clip: with a mean head and ``gradient_clip_val``, ``"joint"`` clips the gradient of all
            the generator's weights together; ``"separate"`` clips μ's and the rest's each on its own,
            so μ's step does not shrink when the DiT's gradient is large; ``"dit"`` clips the DiT's
            alone and leaves μ's unclipped, as the benchmark's MLP hypernetwork is trained.
    """

    def __init__(self, spec: dict[str, Any] | None = None, hidden: int = 256, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, cross_attention: bool = False, condition: ConditionKind = "text",
                 cond_dropout: float = 0.1, text_dropout: float = 0.0, prediction_type: PredictionType = "sample",
                 num_train_timesteps: int = 1000, beta_schedule: BetaSchedule = "squaredcos_cap_v2",
                 functional_loss_weight: float = 1.0,
                 functional_weighting: Literal["signal", "uniform"] = "signal", lr: float = 3e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 100, ema_decay: float = 0.995, sampler: SamplerName | None = None,
                 num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS, loss_weighting: LossWeighting = "none",
                 min_snr_gamma: float = 5.0, timestep_shift: float = 1.0, path_functional_weight: float = 0.0,
                 path_rows: int = 16, objective: Objective = "ddpm", flow_shift: float = 1.0,
                 latent_tokens: int = 0, latent_dim: int = 16, autoencoder_steps: int = 2000,
                 autoencoder_mse_steps: int = 1500, autoencoder_lr: float = 1e-3, autoencoder_width: int = 256,
                 autoencoder_basis: int = 256, autoencoder_input_noise: float = 0.001,
                 autoencoder_latent_noise: float = 0.1, autoencoder_functional_weight: float = 1.0,
                 noise_draws: int = 1, window: int | None = None, train_windows: int = 0,
                 center_tokens: bool = False, mean_head: int = 0,
                 mean_input: Literal["embedding", "raw", "numeric"] = "embedding",
                 mean_functional_weight: float | None = None, mean_clip: Literal["joint", "separate", "dit"] = "joint",
                 sampling_latent_noise: float = 0.0):
        super().__init__()
        if spec is None:
            raise ValueError("WeightDiffusion needs `spec` from the datamodule (link data.spec -> model.spec)")
        if latent_tokens < 0 or (latent_tokens and not 0 <= autoencoder_mse_steps <= autoencoder_steps):
            raise WeightDiffError(f"model options: latent_tokens must be >= 0 and 0 <= autoencoder_mse_steps <= "
                                  f"autoencoder_steps, got {latent_tokens}, {autoencoder_mse_steps}, "
                                  f"{autoencoder_steps}")
        if noise_draws < 1:
            raise WeightDiffError(f"model options: noise_draws must be >= 1, got {noise_draws}")
        if window is not None and (window < 1 or latent_tokens or path_functional_weight > 0):
            raise WeightDiffError(f"model options: window must be >= 1 (got {window}) and is for weight-token "
                                  "diffusion without the on-path loss: set latent_tokens and path_functional_weight "
                                  "to 0 with a window")
        if train_windows < 0 or (train_windows and window is None):
            raise WeightDiffError(f"model options: train_windows = {train_windows} needs window set and must be "
                                  ">= 0 (0: every window at each step)")
        if center_tokens and latent_tokens:
            raise WeightDiffError("model options: center_tokens is for weight-token diffusion; set latent_tokens to 0")
        if mean_head < 0 or (mean_head and (latent_tokens or window is not None or center_tokens
                                            or path_functional_weight > 0)):
            raise WeightDiffError(f"model options: mean_head must be >= 0 (got {mean_head}) and is for weight-token "
                                  "diffusion: set latent_tokens, path_functional_weight to 0, window to null and "
                                  "center_tokens to false with a mean head")
        if not (math.isfinite(sampling_latent_noise) and sampling_latent_noise >= 0) or \
                (sampling_latent_noise > 0 and not latent_tokens):
            raise WeightDiffError(f"model options: sampling_latent_noise must be a finite number >= 0 (got "
                                  f"{sampling_latent_noise}) and is for latent diffusion (latent_tokens > 0)")
        if latent_tokens and path_functional_weight > 0:
            raise WeightDiffError("model options: path_functional_weight applies to weight-token diffusion; "
                                  "set it to 0 with latent_tokens > 0")
        self.save_hyperparameters()
        self.schedule = schedule_of(self.hparams)
        self.sampler = self.schedule.default_sampler(sampler)
        self.generator = build_generator(spec, hidden, depth, heads, mlp_ratio, cross_attention, condition,
                                         text_dropout, latent_config(self.hparams), window, center_tokens,
                                         mean_head, mean_input)
        # Buffers are the layout's integer token ids and lengths: copied from the model at every
        # update, never averaged (an average of equal integers in float32 can round down).
        self.ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=False)
        self.ema.requires_grad_(False)
        if objective == "ddpm":  # the forward process (add_noise, get_velocity) and its ᾱ_t on the module's device
            self.noise_scheduler = self.schedule.training_scheduler()
            self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.float(), persistent=False)
        self.register_buffer("token_length", torch.as_tensor(spec["token_length"], dtype=torch.long),
                             persistent=False)

    # ----------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        # The target network of the functional loss is built (and cached by the datamodule) now,
        # before any step: building it draws from the global random stream training continues from.
        self._functional_parts()
        ae = self.generator.autoencoder
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if ae is not None and not bool(ae.fitted) and dm is not None:
            # On resume the checkpoint's buffers replace these right after.
            ae.fit_basis(self.generator.flat(dm.train_tokens()).to(self.device))
            self._sync_autoencoder()
        if self.hparams.center_tokens and dm is not None and stage == "fit":
            # On resume the checkpoint's center replaces this right after (the same zoo gives the same).
            self.generator.fit_center(dm.train_tokens())
            self.ema.module.token_center.copy_(self.generator.token_center)
            self.ema.module.token_scale.copy_(self.generator.token_scale)
        if mean_input_fitted(self.hparams) and dm is not None and stage == "fit":
            # As the center: fitted from the zoo at every start; on resume the checkpoint's replaces it.
            self.generator.fit_mean_input(dm.condition_vectors())
            self.ema.module.mean_net.load_state_dict(self.generator.mean_net.state_dict())

    def _sync_autoencoder(self) -> None:
        """Copy the autoencoder (weights and buffers) into the EMA model, which does not average it."""
        self.ema.module.autoencoder.load_state_dict(self.generator.autoencoder.state_dict())

    @property
    def in_autoencoder_phase(self) -> bool:
        """(latent) True until the autoencoder is trained and frozen."""
        ae = self.generator.autoencoder
        return ae is not None and not bool(ae.ready)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        ae = self.generator.autoencoder
        if ae is None:
            return
        if not bool(ae.ready) and self.global_step >= self.hparams.autoencoder_steps:
            ae.finish(self.generator.flat(self.trainer.datamodule.train_tokens()).to(self.device))
            self._sync_autoencoder()
            rank_zero_info(f"autoencoder trained ({self.global_step} steps; latent std {float(ae.latent_std):.4f}); "
                           "diffusion in its latent from here")
        if bool(ae.ready):  # frozen from here on (also after a resume): no gradient, no optimizer update
            ae.requires_grad_(False)

    def _functional_parts(self):
        """(tokenizer, target network) for the functional loss, or None. Read from the datamodule on
        every use: on resume it restores the checkpoint's tokenizer after ``setup``."""
        weights = (self.hparams.functional_loss_weight, self.hparams.path_functional_weight,
                   self.hparams.autoencoder_functional_weight if self.hparams.latent_tokens else 0.0,
                   self._mean_functional_weight)
        if max(weights) <= 0 or self._trainer is None:
            return None
        dm = getattr(self.trainer, "datamodule", None)
        return dm.functional_parts() if dm is not None else None

    @property
    def _mean_functional_weight(self) -> float:
        """Weight of μ's task loss (0 without a mean head)."""
        if not self.hparams.mean_head:
            return 0.0
        weight = self.hparams.get("mean_functional_weight")
        return self.hparams.functional_loss_weight if weight is None else weight

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        folder = run_dir(self.trainer) / TOKENIZER_DIR  # on every rank (the folder may be broadcast)
        if self.trainer.is_global_zero:
            dm.tokenizer.save(folder)
            rank_zero_info(f"tokenizer saved to {folder}")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.generator.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if self.generator.autoencoder is not None:
            sched = two_phase_schedule(opt, self.hparams.warmup_steps, self.hparams.autoencoder_steps, total,
                                       first_factor=self.hparams.autoencoder_lr / self.hparams.lr)
        else:
            sched = warmup_cosine(opt, self.hparams.warmup_steps, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        mean_net = self.generator.mean_net
        if mean_net is None or self.hparams.mean_clip == "joint" or not gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        mean_ids = {id(p) for p in mean_net.parameters()}
        groups = [[p for p in self.generator.parameters() if id(p) not in mean_ids]]
        if self.hparams.mean_clip == "separate":
            groups.append(list(mean_net.parameters()))
        for params in groups:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Update the EMA right after the weights change — before any callback (such as
        # ModelCheckpoint at the end of the batch) can save a state that misses this step.
        self.ema.update_parameters(self.generator)

    # ------------------------------------------------------------------------------------ loss
    def _autoencoder_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(latent, first phase) Reconstruction MSE of noised inputs through noised latents, and the
        task cross-entropy of the reconstruction once past ``autoencoder_mse_steps``."""
        net = self.generator
        flat = net.flat(batch["tokens"])  # (B, P)
        ae = net.autoencoder
        rec = ae.decode(ae.encode(flat, noise=True, scaled=False), noise=True, scaled=False)
        losses = {"autoencoder": F.mse_loss(rec, flat)}
        functional = self._functional_parts()
        if (functional is not None and "fx" in batch and self.hparams.autoencoder_functional_weight > 0
                and self.global_step >= self.hparams.autoencoder_mse_steps):
            tokenizer, target_net = functional
            logits = target_net.forward_each(tokenizer.decode_float(net.tokens_of(rec)), batch["fx"])
            losses["autoencoder_functional"] = F.cross_entropy(logits.flatten(0, 1), batch["fy"].flatten())
        return losses

    def _losses(self, batch: dict[str, Any], cond_dropout: float) -> dict[str, torch.Tensor]:
        if self.in_autoencoder_phase:
            return self._autoencoder_losses(batch)
        x0 = full = batch["tokens"]  # (B, L, D)
        tokens = self._train_tokens(x0.shape[1], x0.device)
        if tokens is not None:  # a few windows of each entry: (B, n, D)
            x0 = x0[:, tokens]
        if self.generator.config.center:  # centred generators diffuse the residual
            x0 = self.generator.residual(x0, tokens)
        latent = self.generator.autoencoder is not None
        if latent:  # the frozen autoencoder's latent (B, K, d) is the diffused sample
            with torch.no_grad():
                x0 = self.generator.encode_latent(x0)
        draws = self.hparams.noise_draws
        rows = x0.shape[0]
        x0 = x0.repeat_interleave(draws, 0)  # each entry noised `draws` times: (B · draws, L, D)
        b, length, d = x0.shape
        flow = self.schedule.objective == "flow_matching"
        if flow:
            sigma = sample_sigmas(b, self.hparams.timestep_shift, device=x0.device)
            level = NoiseLevel.from_sigma(sigma)
            t = sigma * self.schedule.num_train_timesteps  # the denoiser's timestep σ · T
        else:
            t = sample_timesteps(b, self.schedule.num_train_timesteps, self.hparams.timestep_shift, device=x0.device)
            level = NoiseLevel.from_alpha_bar(self.alphas_cumprod[t])
        noise = torch.randn_like(x0)
        drop = torch.rand(rows, device=x0.device) < cond_dropout
        cond = self.generator.encode_condition(batch["cond"], drop)
        rows_cond = cond.repeat_interleave(draws) if draws > 1 else cond
        losses: dict[str, torch.Tensor] = {}
        mean = None
        if self.generator.mean_net is not None:  # fit μ(c) as a hypernetwork; the DiT diffuses x0 - μ(c)
            mean = self._mean_losses(batch, cond.vector, losses).detach().repeat_interleave(draws, 0)
            x0 = self.generator.residual(x0, mean=mean)
        if flow:
            x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise  # the straight path x0 -> ε
        else:
            x_t = self.noise_scheduler.add_noise(x0, noise, t)  # sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, DDPM eq. 4
        out = self.generator(x_t, t, rows_cond.vector, rows_cond.context, rows_cond.context_mask, tokens)
        ptype = self.schedule.prediction_type
        if ptype == "sample":
            target = x0
        elif ptype == "epsilon":
            target = noise
        elif ptype == "flow_prediction":  # v = dx_σ/dσ = ε - x0
            target = noise - x0
        else:  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 (Salimans & Ho 2022)
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        lengths = torch.full((length,), d, device=x0.device) if latent else self.token_length
        lengths = (lengths if tokens is None else lengths[tokens]).repeat(b)
        row_weight = None
        if self.hparams.loss_weighting != "none":  # normalised to mean 1: the loss keeps its scale
            w = loss_weight(level.share, self.hparams.loss_weighting, ptype, self.hparams.min_snr_gamma)
            row_weight = (w / w.mean()).repeat_interleave(length)
        losses["weight"] = masked_mse(out.reshape(b * length, d), target.reshape(b * length, d), lengths, row_weight)
        functional = self._functional_parts()
        if functional is not None and "fx" in batch and self.hparams.functional_loss_weight > 0:
            tokenizer, target_net = functional
            x0_hat = self.generator.to_tokens(predicted_x0(out, x_t, level, ptype), tokens, mean)
            if tokens is not None:  # the entry's own tokens outside the fitted windows
                x0_hat = full.repeat_interleave(draws, 0).index_copy(1, tokens, x0_hat)
            params = tokenizer.decode_float(x0_hat)  # name -> (B, *shape), differentiable
            fx, fy = batch["fx"].repeat_interleave(draws, 0), batch["fy"].repeat_interleave(draws, 0)
            logits = target_net.forward_each(params, fx)  # (B, n, C)
            ce = F.cross_entropy(logits.flatten(0, 1), fy.flatten(), reduction="none").view(b, -1)
            w = level.share if self.hparams.functional_weighting == "signal" else torch.ones_like(ce[:, 0])
            losses["functional"] = (w * ce.mean(1)).sum() / w.sum().clamp_min(1e-8)
        if functional is not None and "fx" in batch and self.hparams.path_functional_weight > 0:
            losses["path_functional"] = self._path_functional(batch, cond, functional)
        return losses

    def _mean_losses(self, batch: dict[str, Any], c: torch.Tensor, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """(mean head) Add the conditional mean's losses to ``losses`` — ``mean``: its weight MSE to the
        entries; ``mean_functional``: the task cross-entropy of the weights it decodes to — and return
        it ``(B, L, D)``."""
        x0 = batch["tokens"]
        mean = self.generator.conditional_mean(c, batch["cond"])
        rows, length, d = mean.shape
        losses["mean"] = masked_mse(mean.reshape(rows * length, d), x0.reshape(rows * length, d),
                                    self.token_length.repeat(rows))
        functional = self._functional_parts()
        if functional is not None and "fx" in batch and self._mean_functional_weight > 0:
            tokenizer, target_net = functional
            logits = target_net.forward_each(tokenizer.decode_float(mean), batch["fx"])  # (B, n, C)
            losses["mean_functional"] = F.cross_entropy(logits.flatten(0, 1), batch["fy"].flatten())
        return mean

    def _train_tokens(self, length: int, device: torch.device) -> torch.Tensor | None:
        """Indices ``(n,)`` of the weight tokens fitted this step: ``train_windows`` random windows, or None (all)."""
        window, count = self.hparams.window, self.hparams.train_windows
        if window is None or not count:
            return None
        total = -(-length // window)
        if count >= total:
            return None
        chosen = torch.randperm(total, device="cpu")[:count]
        return window_tokens(length, window, chosen).to(device)

    def _path_functional(self, batch: dict[str, Any], cond: Any, functional: tuple) -> torch.Tensor:
        """Task cross-entropy of x̂0 on a state the sampler visits (:func:`objectives.sampler_states`).

        The path is run without gradient from fresh noise with this batch's conditions; the
        gradient flows through the one model evaluation at the state reached.
        """
        tokenizer, target_net = functional
        n = min(self.hparams.path_rows, batch["tokens"].shape[0])
        steps = self.hparams.num_inference_steps if self.sampler != "x0" else 1
        sampler = self.sampler if self.sampler != "x0" else DEFAULT_SAMPLERS[self.schedule.objective]
        stop = int(torch.randint(0, steps, ()).item())
        rows = cond.rows(slice(0, n))
        frozen = rows.detach()
        noise = torch.randn((n, *batch["tokens"].shape[1:]), device=batch["tokens"].device)
        x_k, t_k = sampler_states(lambda x, t: self.generator(x, t, frozen.vector, frozen.context, frozen.context_mask),
                                  noise, self.schedule, steps=steps, stop=stop, sampler=sampler,
                                  valid=self.generator.valid)
        out = self.generator(x_k, t_k, rows.vector, rows.context, rows.context_mask)
        table = self.alphas_cumprod if self.schedule.objective == "ddpm" else None
        x0_hat = predicted_x0(out, x_k, self.schedule.noise_level(t_k, table), self.schedule.prediction_type)
        logits = target_net.forward_each(tokenizer.decode_float(x0_hat), batch["fx"][:n])  # (n, m, C)
        return F.cross_entropy(logits.flatten(0, 1), batch["fy"][:n].flatten())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch, self.hparams.cond_dropout)
        weights = {"functional": self.hparams.functional_loss_weight,
                   "mean_functional": self._mean_functional_weight,
                   "path_functional": self.hparams.path_functional_weight,
                   "autoencoder_functional": self.hparams.autoencoder_functional_weight}
        loss = sum(weights.get(k, 1.0) * v for k, v in losses.items())
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
        std = self.hparams.get("sampling_latent_noise", 0.0)
        x_t = latent = None
        if std > 0:  # x_T first, then the latent noise, from the same generator (as sampling draws them)
            rows = (raw_cond[0] if isinstance(raw_cond, tuple) else raw_cond).shape[0]
            x_t = torch.randn((rows * num, *net.sample_shape), generator=generator)
            latent = torch.randn(x_t.shape, generator=generator) * std
        return sample_tokens(net, raw_cond, num, self.schedule, steps=steps or self.hparams.num_inference_steps,
                             sampler=sampler or self.sampler, guidance=guidance, generator=generator, noise=x_t,
                             latent_noise=latent)
