"""Transition frames between a reference and a target, for CAV-SAM's pseudo-videos.

A generator is any callable ``(reference, reference_mask, target, alphas) -> frames``: uint8
RGB arrays in, one uint8 RGB frame per ``alpha`` out (0 = reference, 1 = target), each of the
target's size. :data:`TRANSITIONS` names the built-in ones:

* ``concat``: no transition frame; the pseudo-video is just reference -> target. CAV-SAM's
  paper reports this "concatenation" baseline at 60.68 mean IoU (1-shot, four cross-domain
  datasets), above its mixup (52.21) and affine (56.84) videos.
* ``crossfade``: cross-dissolve ``(1 - alpha) * reference + alpha * target`` after resizing
  the reference to the target's size. Cheap (no model), a "mixup video": the paper measured
  mixup frames below plain concatenation, so expect ``concat`` to be at least as good without
  DBST; ``crossfade`` mainly gives TTGA's pseudo-labels frames to live on.
* ``dbst``: the paper's diffusion-based semantic transition (DiffMorpher-style, see
  :class:`DiffusionTransition`). Needs ``diffusers`` and a Stable Diffusion checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pivotseg.errors import ConfigError

TransitionGenerator = Callable[
    [np.ndarray, np.ndarray, np.ndarray, Sequence[float]], list[np.ndarray]
]


def transition_alphas(num_frames: int, first: float = 0.2, last: float = 0.8) -> list[float]:
    """Evenly spaced blend weights; the paper's 7 frames are 0.2, 0.3, ..., 0.8."""
    if num_frames <= 0:
        return []
    if num_frames == 1:
        return [(first + last) / 2]
    return [float(a) for a in np.linspace(first, last, num_frames)]


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 image resized (bilinear) to ``(H, W)``."""
    if image.shape[:2] == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


class ConcatTransition:
    """No transition frames (the reference is followed directly by the target)."""

    def __call__(self, reference, reference_mask, target, alphas) -> list[np.ndarray]:
        return []


class CrossDissolve:
    """``(1 - alpha) * reference + alpha * target``, the reference resized to the target size."""

    def __call__(self, reference, reference_mask, target, alphas) -> list[np.ndarray]:
        ref = resize_to(reference, target.shape[:2]).astype(np.float32)
        tgt = target.astype(np.float32)
        return [((1 - a) * ref + a * tgt).round().clip(0, 255).astype(np.uint8) for a in alphas]


class DiffusionTransition:
    """DBST: diffusion-based semantic transition (CAV-SAM, after DiffMorpher).

    For each image pair: a LoRA (rank 16) is trained on each image alone (``lora_steps`` of
    AdamW at ``lora_lr`` on the denoising loss, conditioned on ``prompt``); each image is
    DDIM-inverted (``inversion_steps``) under its own LoRA; for every ``alpha`` the two LoRAs'
    weights are interpolated linearly, the inverted latents are spherically interpolated and
    re-normalised per channel to the interpolated mean/std (AdaIN), and the result is denoised
    with DDIM and decoded. DiffMorpher's refinement modules are left out, as in CAV-SAM.

    Approximations, stated because they could not be checked here: interpolating the LoRA
    factors A and B separately (as DiffMorpher does) rather than their product; no classifier-
    free guidance (``guidance_scale`` 1); images are square-resized to ``resolution`` for the
    diffusion model. This class has never run against a real checkpoint in this repository's
    tests (no Stable Diffusion weights are available offline).

    Args:
        checkpoint: a diffusers Stable Diffusion folder or hub id (the paper uses SD-2.1-base).
        prompt: the text condition, e.g. ``"a photo of a cat"`` (the paper: the class name).
        device: torch device.
    """

    def __init__(
        self,
        checkpoint: str,
        prompt: str = "a photo of an object",
        lora_steps: int = 200,
        lora_rank: int = 16,
        lora_lr: float = 2e-4,
        inversion_steps: int = 20,
        resolution: int = 512,
        device: str = "cpu",
        seed: int = 0,
        show_progress: bool = True,
    ):
        try:
            from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
        except ImportError:
            raise ConfigError(
                "the dbst transition needs the diffusers package (pip install diffusers) and a "
                "Stable Diffusion checkpoint; or use --transition crossfade|concat"
            ) from None
        # Safetensors only: a .bin fallback would unpickle files from the checkpoint folder.
        pipe = StableDiffusionPipeline.from_pretrained(checkpoint, use_safetensors=True)
        self.pipe = pipe.to(device)
        self.ddim = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.ddpm = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prompt = prompt
        self.lora_steps, self.lora_rank, self.lora_lr = lora_steps, lora_rank, lora_lr
        self.inversion_steps = inversion_steps
        self.resolution = resolution
        self.device = torch.device(device)
        self.seed = seed
        self.show_progress = show_progress
        self._adapter_added = False

    # ----- pieces ---------------------------------------------------------------------------
    @torch.no_grad()
    def text_embedding(self) -> torch.Tensor:
        tok = self.pipe.tokenizer(
            self.prompt,
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        x = resize_to(image, (self.resolution, self.resolution))
        x = torch.from_numpy(x).permute(2, 0, 1)[None].float().to(self.device) / 127.5 - 1
        vae = self.pipe.vae
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        vae = self.pipe.vae
        x = vae.decode(latents / vae.config.scaling_factor).sample
        x = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
        return resize_to(x, size)

    def _ensure_adapter(self) -> None:
        if self._adapter_added:
            return
        from peft import LoraConfig

        unet = self.pipe.unet
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=self.lora_rank,
                lora_alpha=self.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        self._initial_lora = self.lora_state()
        self._adapter_added = True

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.pipe.unet).items()}

    def load_lora(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.pipe.unet, state)

    def train_lora(self, latents: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fresh LoRA fitted to one image's latents; returns its weights."""
        self._ensure_adapter()
        self.load_lora(self._initial_lora)
        unet = self.pipe.unet
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lora_lr)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        steps = range(self.lora_steps)
        for _ in tqdm(steps, desc="dbst lora", disable=not self.show_progress):
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            t = torch.randint(0, self.ddpm.config.num_train_timesteps, (1,), generator=gen)
            t = t.to(self.device)
            noisy = self.ddpm.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=text).sample
            if self.ddpm.config.prediction_type == "v_prediction":
                target = self.ddpm.get_velocity(latents, noise, t)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return self.lora_state()

    def _eps(self, x: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
        """Predicted noise at timestep ``t`` (converting a v-prediction when needed)."""
        out = self.pipe.unet(x, t, encoder_hidden_states=text).sample
        if self.ddim.config.prediction_type == "v_prediction":
            a = self.ddim.alphas_cumprod[t].to(x)
            return a.sqrt() * out + (1 - a).sqrt() * x
        return out

    def _alpha(self, t: int) -> torch.Tensor:
        return self.ddim.alphas_cumprod[t] if t >= 0 else self.ddim.final_alpha_cumprod

    def _ddim_move(self, x, eps, t_from: int, t_to: int) -> torch.Tensor:
        a_from, a_to = self._alpha(t_from).to(x), self._alpha(t_to).to(x)
        x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM inversion from the clean latents to the last timestep."""
        self.ddim.set_timesteps(self.inversion_steps)
        steps = [int(t) for t in self.ddim.timesteps.flip(0)]  # ascending
        x, previous = latents, -1
        for t in steps:
            # The noise is predicted at the step's target timestep from the current latents
            # (the usual DDIM-inversion approximation).
            x = self._ddim_move(x, self._eps(x, t, text), previous, t)
            previous = t
        return x

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.ddim.set_timesteps(self.inversion_steps)
        steps = [int(t) for t in self.ddim.timesteps]  # descending
        for i, t in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else -1
            x = self._ddim_move(x, self._eps(x, t, text), t, nxt)
        return x

    # ----- generator ------------------------------------------------------------------------
    def __call__(self, reference, reference_mask, target, alphas) -> list[np.ndarray]:
        if len(alphas) == 0:
            return []
        text = self.text_embedding()
        z_ref, z_tgt = self.encode(reference), self.encode(target)
        lora_ref = self.train_lora(z_ref, text)
        inv_ref = self._invert_with(lora_ref, z_ref, text)
        lora_tgt = self.train_lora(z_tgt, text)
        inv_tgt = self._invert_with(lora_tgt, z_tgt, text)
        frames = []
        for a in alphas:
            self.load_lora({k: (1 - a) * lora_ref[k] + a * lora_tgt[k] for k in lora_ref})
            z = adain(slerp(inv_ref, inv_tgt, a), inv_ref, inv_tgt, a)
            frames.append(self.decode(self.denoise(z, text), target.shape[:2]))
        return frames

    def _invert_with(self, lora, latents, text):
        self.load_lora(lora)
        return self.invert(latents, text)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (linear when nearly parallel)."""
    fa, fb = a.flatten(), b.flatten()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp(min=1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))
    if float(theta) < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def adain(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Re-normalise ``x`` per channel to the interpolated mean/std of ``a`` and ``b``."""
    dims = (-2, -1)
    mean = (1 - t) * a.mean(dims, keepdim=True) + t * b.mean(dims, keepdim=True)
    std = (1 - t) * a.std(dims, keepdim=True) + t * b.std(dims, keepdim=True)
    normed = (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp(min=1e-6)
    return normed * std + mean


TRANSITIONS: dict[str, Callable[..., TransitionGenerator]] = {
    "concat": ConcatTransition,
    "crossfade": CrossDissolve,
    "dbst": DiffusionTransition,
}


def build_transition(name: str, **kwargs) -> TransitionGenerator:
    """A generator from :data:`TRANSITIONS` (``dbst`` needs ``checkpoint=...``)."""
    if name not in TRANSITIONS:
        raise ConfigError(f"unknown transition {name!r}; known: {', '.join(TRANSITIONS)}")
    if name == "dbst" and "checkpoint" not in kwargs:
        raise ConfigError(
            "the dbst transition needs a Stable Diffusion checkpoint (--sd-checkpoint)"
        )
    return TRANSITIONS[name](**kwargs)
