"""A weight autoencoder for latent diffusion over whole weight sets.

The autoencoder maps one weight set's tokens ``(L, D)`` to a few latent tokens ``(K, d)`` and back;
the DiT then diffuses in that latent (Rombach et al. 2022's latent diffusion; the noise-augmented
weight autoencoder of p-diff, Wang et al. 2024). Three choices make it fit a zoo of a few hundred
checkpoints on a CPU:

- **Principal coordinates.** Before the encoder's MLP the flat weights are projected on the
  zoo's first ``basis`` principal directions, and the decoder's MLP output is mapped back through
  the same basis (plus the zoo mean). With ``basis`` ≥ the number of training checkpoints the
  projection is exact on the zoo: no reconstruction is lost to it, and the MLPs are small
  (they see ``basis`` numbers, not the ``P`` weights).
- **Normalised latents.** The encoder output is layer-normalised over its ``K · d`` entries
  (no affine), so its scale is fixed and the noise added in training means the same at every step.
- **Noise augmentation.** In training, noise of std ``input_noise`` (normalised weight units) is
  added to the encoder input and of std ``latent_noise`` to the latent before decoding; with the
  functional loss this trains the decoder to map a neighbourhood of each zoo latent to working
  weights, which is where novel samples come from.

The basis, mean and scales are buffers fitted from the training weights (:meth:`fit_basis`,
:meth:`finish`) and saved with the generator's weights. The autoencoder works on flat weights;
:class:`~weightdiff.models.generator.WeightGenerator` moves between those and tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_layers(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes``, with LayerNorm + SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(b), nn.SiLU()]
    return nn.Sequential(*layers)


class WeightAutoencoder(nn.Module):
    """Flat normalised weights ``(B, P)`` ↔ latent tokens ``(B, K, d)``.

    Args:
        num_params: P, the weights of one set (valid token entries).
        latent_tokens, latent_dim: the latent's shape (K, d).
        width: hidden width of the encoder and decoder MLPs (the decoder's last hidden layer is 2×).
        basis: number of principal directions of the zoo the MLPs work in (at most P).
        input_noise, latent_noise: training noise stds (see the module docstring).
    """

    def __init__(self, num_params: int, latent_tokens: int = 4, latent_dim: int = 16, width: int = 256,
                 basis: int = 256, input_noise: float = 0.001, latent_noise: float = 0.1):
        super().__init__()
        if min(num_params, latent_tokens, latent_dim, width, basis) < 1:
            raise ValueError(f"num_params, latent_tokens, latent_dim, width and basis must be >= 1, got {num_params}, "
                             f"{latent_tokens}, {latent_dim}, {width}, {basis}")
        if input_noise < 0 or latent_noise < 0:
            raise ValueError(f"input_noise and latent_noise must be >= 0, got {input_noise} and {latent_noise}")
        self.latent_shape = (latent_tokens, latent_dim)
        self.input_noise, self.latent_noise = input_noise, latent_noise
        k = min(basis, num_params)
        latent = latent_tokens * latent_dim
        self.encoder = mlp_layers([k, width, width, latent])
        self.decoder = mlp_layers([latent, width, 2 * width, k])
        self.register_buffer("basis", torch.zeros(num_params, k))     # (P, k), orthonormal columns
        self.register_buffer("mean", torch.zeros(num_params))         # (P,)
        self.register_buffer("scale", torch.ones(()))                 # std of the principal coordinates
        self.register_buffer("latent_std", torch.ones(()))            # std of the training latents
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_basis(self, flat: torch.Tensor) -> None:
        """Fit mean, principal directions and coordinate scale on training weights ``(N, P)``.

        Directions beyond the data's rank (``basis`` > N - 1) are kept as zero columns.
        """
        flat = flat.double()
        mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)   # vh (min(N, P), P)
        k = self.basis.shape[1]
        basis = torch.zeros(self.basis.shape, dtype=torch.float64)
        basis[:, :min(k, vh.shape[0])] = vh[:k].T
        coords = (flat - mean) @ basis
        self.mean.copy_(mean.float())
        self.basis.copy_(basis.float())
        self.scale.copy_(coords.std().clamp_min(1e-12).float())
        self.fitted.fill_(True)

    @torch.no_grad()
    def finish(self, flat: torch.Tensor) -> None:
        """End of autoencoder training: fit the latent scale on training weights ``(N, P)`` (the mean over
        latent entries of their std over the zoo; 1 for a single entry), mark ready."""
        z = self.encode(flat, scaled=False).flatten(1)
        self.latent_std.copy_(z.std(0).mean().clamp_min(1e-12) if len(z) > 1 else torch.ones(()))
        self.ready.fill_(True)

    def encode(self, flat: torch.Tensor, noise: bool = False, scaled: bool = True) -> torch.Tensor:
        """Weights ``(B, P)`` → latent ``(B, K, d)``; ``noise``: add the input noise first.

        The encoder's output has unit RMS per sample; ``scaled`` divides it by :attr:`latent_std`
        (the latent the DiT diffuses in has unit std over the zoo).
        """
        if noise and self.input_noise > 0:
            flat = flat + self.input_noise * torch.randn_like(flat)
        z = self.encoder((flat - self.mean) @ self.basis / self.scale)
        z = F.layer_norm(z, z.shape[-1:])
        return (z / self.latent_std if scaled else z).view(-1, *self.latent_shape)

    def decode(self, latent: torch.Tensor, noise: bool = False, scaled: bool = True) -> torch.Tensor:
        """Latent ``(B, K, d)`` → weights ``(B, P)``; ``noise``: add the latent noise first (unscaled units)."""
        z = latent.flatten(1) * (self.latent_std if scaled else 1.0)
        if noise and self.latent_noise > 0:
            z = z + self.latent_noise * torch.randn_like(z)
        return self.mean + (self.decoder(z) * self.scale) @ self.basis.T
