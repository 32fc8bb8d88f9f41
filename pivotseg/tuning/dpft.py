"""``dpft``: Dynamic Prompt Fine-Tuning, our design of SPL/DPFT (methods.md section 2 [P]).

A drop-in replacement for Rein (:mod:`pivotseg.tuning.rein`): class-structured prompt banks
whose class tokens are gated by class presence (Dynamic Class-aware Prompter), a prompt-guided
feature update with a focus gate after each refined block (Prompt-guided Feature Focuser), set
pivots (:class:`~pivotseg.tuning.pivots.PivotBank`) and a pivot loss. Each of these
ingredients is a switch, off by default: in the paired ablation none showed a gain whose 95 %
interval excludes 0 (docs/benchmarks.md, "DPFT ablation on CPU"). With every switch off DPFT is
Rein-style tokens with a learned ``W_q``/``W_k`` attention and a per-block gamma on the deepest
60 % of the blocks, without set pivots.

The design, where it departs from methods.md and why, the measurements behind its defaults and
its parameter budget: docs/methods.md, section "`dpft`".
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError
from pivotseg.tuning.base import Rule
from pivotseg.tuning.pivots import PivotBank, class_pool, patch_classes, pivot_info_nce
from pivotseg.tuning.rein import NO_DECAY, TokenMethod

# The presence calibration's scale and bias live on a logit scale of a few units; at the base
# learning rate Adam moves a parameter by about 0.1 over the 200-iteration CPU protocol.
PRESENCE_LR_MULT = 10.0
# Share of the blocks, the deepest, that DPFT refines by default.
DEFAULT_DEPTH = 0.6
# The ablation's ingredient switches, all off by default (docs/methods.md, "dpft").
INGREDIENTS = ("class_prompts", "presence_gating", "dynamic_context", "focus_gate", "pivot_loss")


class DPFT(TokenMethod):
    """DPFT: class-aware dynamic prompts, focused feature refinement and set pivots.

    Args:
        backbone: the backbone (frozen on attach).
        num_classes: K, the classes of the segmentation task.
        num_tokens: total tokens per block used to size the generic group (100, as Rein).
        per_class: prompt tokens per class.
        generic_tokens: G; default fills to ``num_tokens`` (at least ``min_generic``).
        min_generic: the least G when the class tokens fill ``num_tokens``.
        rank: r of ``E_l = A_l B_l``.
        query_dim: width of :meth:`queries`.
        attn_dim: d of ``W_q``/``W_k``.
        context_rank: hidden width of ``U``.
        gamma_init: initial per-layer scale.
        blocks: blocks DPFT refines (negative indices count from the end, ``"all"`` = every
            block); default the deepest ``ceil(0.6 L)`` of the L blocks.
        presence_blocks: blocks where the presence gate acts and is supervised (a subset of
            ``blocks``); default the last of ``blocks``.
        presence_weight: weight of the presence BCE (0 = the gate is not supervised).
        presence_tau: tau of the presence soft maximum.
        presence_calibration: standardise each presence block's scores per class with source
            statistics (see the module docstring); off = the raw score into the calibration.
        presence_sharpness: the standardised logit at the mean score of present classes (minus
            that of absent ones): 4 gives rho ~ 0.88 / 0.12 there before training.
        presence_momentum: EMA momentum of the calibration statistics during training.
        pivot_momentum: EMA momentum of the pivots.
        pivot_weight: lambda_p of the pivot loss.
        pivot_tau: InfoNCE temperature.
        pivot_layers: blocks whose PFF outputs enter the pivot loss (default: the backbone's
            ``out_indices`` among ``blocks``).
        ortho_weight: weight of the optional prompt orthogonality penalty (0 = off).
        warmup_images: source images the engine runs before training to set the pivots and the
            calibration (:meth:`warm_up`); 0 = none, and always 0 without set pivots (neither
            ``presence_gating`` nor ``pivot_loss``).
        class_prompts: class-structured prompt bank (``per_class`` tokens per class).
        presence_gating: gate the class tokens by class presence against set pivots (needs
            ``class_prompts``).
        dynamic_context: prompts shifted by the context MLP ``U(z)`` of the block's mean token.
        focus_gate: scale each patch's update by ``g = 1 - S_0``.
        pivot_loss: InfoNCE of class means against the set pivots (``pivot_weight``).

        These five are off by default: in the 3-seed paired ablation none adds a gain whose
        95 % interval excludes 0, on source val or on the targets (docs/benchmarks.md, "DPFT
        ablation on CPU"), so they would be weight and time without a measured benefit. Turn
        them on through ``method_args``; SPL adaptation needs set pivots, i.e. a run trained
        with ``pivot_loss`` or ``presence_gating`` on. The ``presence_*`` and ``pivot_*``
        options only matter when their mechanism is on.
        link_queries: build the query link (off for heads without queries).
        ignore_index: label value without a class.
    """

    name = "dpft"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        num_tokens: int = 100,
        per_class: int = 4,
        generic_tokens: int | None = None,
        min_generic: int = 8,
        rank: int = 16,
        query_dim: int = 256,
        attn_dim: int = 256,
        context_rank: int = 64,
        gamma_init: float = 0.3,
        blocks: list[int] | str | None = None,
        presence_blocks: list[int] | None = None,
        presence_weight: float = 0.1,
        presence_tau: float = 0.07,
        presence_calibration: bool = True,
        presence_sharpness: float = 4.0,
        presence_momentum: float = 0.99,
        pivot_momentum: float = 0.999,
        pivot_weight: float = 0.1,
        pivot_tau: float = 0.1,
        pivot_layers: list[int] | None = None,
        ortho_weight: float = 0.0,
        warmup_images: int = 0,
        class_prompts: bool = False,
        presence_gating: bool = False,
        dynamic_context: bool = False,
        focus_gate: bool = False,
        pivot_loss: bool = False,
        link_queries: bool = True,
        ignore_index: int = 255,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "backbone", "num_classes")}
        args.pop("__class__", None)
        super().__init__(backbone, num_classes, **args)
        if presence_gating and not class_prompts:
            raise ConfigError(
                "dpft: presence_gating gates class tokens; turn class_prompts on or gating off"
            )
        self.require_blocks()
        n, dims = backbone.num_blocks, backbone.block_dims
        if blocks == "all":
            blocks = list(range(n))
        elif blocks is None:
            # The deepest 60%: training backpropagates from the head to the first refined block
            # and so keeps the activations of every frozen block after it.
            blocks = list(range(n - math.ceil(DEFAULT_DEPTH * n), n))
        blocks = _resolve_blocks(blocks, n, "blocks")
        if presence_blocks is None:
            # The last: its own input feeds the pivots of its width, so the cosines compare like
            # with like (the block before it failed the bar on source val, docs/benchmarks.md).
            presence_blocks = blocks[-1:]
        presence_blocks = _resolve_blocks(presence_blocks, n, "presence_blocks")
        if presence_gating and not set(presence_blocks) <= set(blocks):
            raise ConfigError(
                f"dpft: presence_blocks {presence_blocks} must be among blocks {blocks}; "
                "add them to blocks or pick presence_blocks from it"
            )

        self.per_class = per_class if class_prompts else 0
        class_count = num_classes * self.per_class
        if generic_tokens is None:
            generic_tokens = max(num_tokens - 1 - class_count, min_generic if class_prompts else 0)
        self.num_generic = generic_tokens
        self.build_tokens(1 + class_count + generic_tokens, rank, query_dim, link_queries, blocks)

        self.class_prompts, self.presence_gating = class_prompts, presence_gating
        self.dynamic_context, self.focus_gate = dynamic_context, focus_gate
        self.pivot_loss = pivot_loss
        self.presence_tau, self.pivot_weight, self.pivot_tau = presence_tau, pivot_weight, pivot_tau
        self.presence_weight = presence_weight
        self.ortho_weight, self.ignore_index = ortho_weight, ignore_index
        self.presence_calibration = presence_calibration and presence_gating
        self.presence_sharpness, self.presence_momentum = presence_sharpness, presence_momentum
        self.warmup_images = warmup_images if (presence_gating or pivot_loss) else 0
        self.attn_dim = attn_dim

        # Class of each token: -1 for the null and generic tokens.
        token_class = torch.full((self.num_tokens,), -1, dtype=torch.long)
        if class_count:
            token_class[1 : 1 + class_count] = torch.arange(num_classes).repeat_interleave(
                self.per_class
            )
        self.register_buffer("token_class", token_class, persistent=False)

        self.attn_q = nn.ModuleDict(
            {str(c): nn.Linear(c, attn_dim, bias=False) for c in self.widths}
        )
        self.attn_k = nn.ModuleDict(
            {str(c): nn.Linear(c, attn_dim, bias=False) for c in self.widths}
        )
        self.gamma = nn.Parameter(torch.full((len(blocks),), float(gamma_init)))
        if dynamic_context:
            self.context = nn.ModuleDict(
                {str(c): _zero_output_mlp(c, context_rank) for c in self.widths}
            )
        # Presence block -> its row of the per-block presence parameters and statistics.
        self.presence_blocks = presence_blocks if presence_gating else []
        self._presence_slot = {b: s for s, b in enumerate(self.presence_blocks)}
        if presence_gating:
            shape = (len(self.presence_blocks), num_classes)
            # Per block and class: logit = exp(scale) * standardised score + bias.
            self.presence_scale = nn.Parameter(torch.zeros(shape))
            self.presence_bias = nn.Parameter(torch.zeros(shape))
            if self.presence_calibration:
                # Mean score when present / absent, and whether measured yet: buffers like the
                # pivots, saved with the model, never trained by gradients.
                self.register_buffer("presence_stats", torch.zeros(*shape, 2))
                self.register_buffer("presence_seen", torch.zeros(*shape, 2, dtype=torch.bool))

        # Pivots: one bank per width, fed by the last block of that width that DPFT refines and
        # a forward runs.
        last = self.last_run_block()
        self.pivot_blocks = {
            c: max(i for i in blocks if i <= last and dims[i] == c)
            for c in self.widths
            if any(i <= last and dims[i] == c for i in blocks)
        }
        if presence_gating or pivot_loss:
            self.pivot_banks = nn.ModuleDict(
                {str(c): PivotBank(num_classes, c, pivot_momentum) for c in self.pivot_blocks}
            )
        layers = pivot_layers if pivot_layers is not None else backbone.out_indices
        self.pivot_layers = sorted({i % n for i in layers if -n <= i < n} & set(blocks))
        self.pivot_layers = [i for i in self.pivot_layers if dims[i] in self.pivot_blocks]
        # Filled by the hooks during a forward, emptied by extra_loss / init_pivots:
        # width -> (pivot-block tokens, grid, block index); block index -> (PFF output, grid).
        self._pivot_cache: dict[int, tuple[torch.Tensor, tuple[int, int], int]] = {}
        self._loss_cache: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        # presence block -> (raw scores (B, K) detached, valid pivots (K,), grid, logits (B, K),
        # gated classes (K,)); the statistics and the BCE need the labels, which come later.
        self._presence_cache: dict[int, tuple] = {}
        self._init_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # presence block -> (K, 2) warm-up batches that measured each class present / absent
        self._calibration_counts: dict[int, torch.Tensor] = {}

    @property
    def uses_pivots(self) -> bool:
        return self.presence_gating or self.pivot_loss

    # ----- forward ----------------------------------------------------------------------------
    def update(self, index: int, f: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        c = f.shape[-1]
        key = str(c)
        if self.uses_pivots and self.pivot_blocks.get(c) == index:
            self._pivot_cache[c] = (f.detach(), hw, index)
        tokens = self.layer_tokens(index).to(f.dtype)  # (M, c)
        gated = self.presence_gating and index in self._presence_slot
        log_rho = self.token_log_presence(f, index, hw) if gated else None
        if self.dynamic_context:
            shift = self.context[key](f.mean(1))[:, None, :]  # (B, 1, c)
            tokens = tokens + (shift if log_rho is None else log_rho.exp()[..., None] * shift)
        # (f W_q^T)(T W_k^T)^T = f (T W_k^T W_q)^T: project the M tokens, not the N patches.
        keys = self.attn_k[key](tokens) @ self.attn_q[key].weight  # (M, c) or (B, M, c)
        logits = f @ keys.transpose(-1, -2) * self.attn_dim**-0.5
        if log_rho is not None:
            logits = logits + log_rho[:, None, :]
        attn = F.softmax(logits, dim=-1)
        # A zero value row for the null token: S[:, :, 1:] @ V without copying a slice of S.
        values = F.pad(self.mlp_token2feat[key](tokens[..., 1:, :]), (0, 0, 1, 0))
        delta = attn @ values
        delta = self.mlp_delta_f[key](delta + f)
        scale = self.gamma[self._token_slot[index]]
        if self.focus_gate:
            scale = scale * self.focus(attn)  # (B, N, 1): one pass over delta below, not two
        out = torch.addcmul(f, scale, delta)
        if self.training and self.pivot_loss and index in self.pivot_layers:
            self._loss_cache[index] = (out, hw)
        return out

    def focus(self, attn: torch.Tensor) -> torch.Tensor:
        """The focus gate ``g = 1 - S_0`` ``(B, N, 1)`` of the attention ``S (B, N, M)``."""
        return 1.0 - attn[..., :1]

    def presence_scores(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K)`` raw scores (log-mean-exp of cos / tau) and the ``(K,)`` valid pivots.

        Of detached features: trained through the features too, the presence BCE pulled them
        away from the calibration statistics and the gate separated worse (source val, seed 0).
        """
        bank = self.pivot_banks[str(f.shape[-1])]
        f = f.detach()
        cos = F.normalize(f, dim=-1) @ F.normalize(bank.pivots.to(f.dtype), dim=-1).T
        soft_max = torch.logsumexp(cos / self.presence_tau, dim=1) - math.log(f.shape[1])
        return soft_max, bank.valid

    def class_presence_logits(
        self, f: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K)`` presence logits of tokens ``f`` at presence block ``index`` and the
        ``(K,)`` mask of the classes the gate acts on (a valid pivot and, with calibration,
        statistics)."""
        _, _, logits, gated = self._presence(f, index)
        return logits, gated

    def _presence(self, f: torch.Tensor, index: int):
        """Raw scores, valid pivots, calibrated logits and gated classes at block ``index``."""
        scores, valid = self.presence_scores(f)
        slot = self._presence_slot[index]
        # A copy: the BCE indexes with the mask after extra_loss updated the pivots in place.
        standard, gated = scores, valid.clone()
        if self.presence_calibration:
            # A copy: extra_loss updates the statistics in place before the backward pass.
            pos, neg = self.presence_stats[slot].to(scores.dtype, copy=True).unbind(-1)
            ready = self.presence_seen[slot].all(-1) & (pos > neg)
            gap = torch.where(ready, pos - neg, torch.ones_like(pos))
            standard = self.presence_sharpness * (scores - (pos + neg) / 2) / gap
            gated = valid & ready
        logits = standard * self.presence_scale[slot].exp() + self.presence_bias[slot]
        return scores, valid, logits, gated

    def token_log_presence(
        self, f: torch.Tensor, index: int, hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``log rho~`` per token ``(B, M)``: 0 for null/generic tokens and ungated classes."""
        scores, valid, logits, gated = self._presence(f, index)
        # The labels arrive later (extra_loss / init_pivots): statistics and BCE are done there.
        self._presence_cache[index] = (scores.detach().float(), valid.clone(), hw, logits, gated)
        log_rho = F.logsigmoid(logits) * gated.to(logits.dtype)  # (B, K)
        log_rho = torch.cat([log_rho, log_rho.new_zeros(log_rho.shape[0], 1)], dim=1)
        columns = self.token_class % (self.num_classes + 1)  # -1 -> the zero column
        return log_rho[:, columns]

    # ----- losses and pivots --------------------------------------------------------------------
    def _classes_memo(self, labels: torch.Tensor):
        """``classes_of(hw, stride)``: :func:`patch_classes` of ``labels``, once per grid."""
        memo: dict[tuple, torch.Tensor] = {}

        def classes_of(hw, stride):
            if (hw, stride) not in memo:
                memo[hw, stride] = patch_classes(
                    labels, hw, stride, self.num_classes, self.ignore_index
                )
            return memo[hw, stride]

        return classes_of

    def _present(self, classes: torch.Tensor) -> torch.Tensor:
        """``(B, K)``: the class has at least one token in the image (``classes (B, N)``)."""
        ids = torch.arange(self.num_classes, device=classes.device)
        return (classes[..., None] == ids).any(1)

    def extra_loss(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pivot loss, presence BCE (training only) and the optional prompt penalty; then one
        EMA step of the pivots and the presence statistics (training only)."""
        losses: dict[str, torch.Tensor] = {}
        strides = self.backbone.block_strides()
        classes_of = self._classes_memo(labels)

        if self.pivot_loss and self._loss_cache:
            terms = []
            for index, (out, hw) in sorted(self._loss_cache.items()):
                bank = self.pivot_banks[str(out.shape[-1])]
                sums, counts = class_pool(out, classes_of(hw, strides[index]), self.num_classes)
                present = counts > 0
                anchors = sums[present] / counts[present][:, None]
                anchor_classes = torch.arange(self.num_classes, device=out.device).expand_as(
                    counts
                )[present]
                terms.append(
                    pivot_info_nce(anchors, anchor_classes, bank.pivots, bank.valid, self.pivot_tau)
                )
            losses["loss_pivot"] = self.pivot_weight * torch.stack(terms).mean()
        if self.training and self.presence_weight > 0 and self._presence_cache:
            losses["loss_presence"] = self.presence_weight * self._presence_bce(classes_of)
        if self.ortho_weight > 0 and self.class_prompts:
            losses["loss_prompt_ortho"] = self.ortho_weight * self.prompt_orthogonality()
        if self.training and self.presence_calibration:
            self._update_presence_stats(classes_of, self.presence_momentum)
        if self.training and self.uses_pivots:
            for c, (feat, hw, index) in self._pivot_cache.items():
                sums, counts = class_pool(feat, classes_of(hw, strides[index]), self.num_classes)
                self.pivot_banks[str(c)].update(sums.sum(0), counts.sum(0))
        self._loss_cache.clear()
        self._pivot_cache.clear()
        self._presence_cache.clear()
        return losses

    def _presence_bce(self, classes_of) -> torch.Tensor:
        """Mean over presence blocks of the BCE between the gated classes' presence logits and
        whether each class has a token in the image; a zero of the graph while none is gated."""
        strides = self.backbone.block_strides()
        terms = []
        for index, (_, _, hw, logits, gated) in sorted(self._presence_cache.items()):
            if gated.any():
                present = self._present(classes_of(hw, strides[index]))
                terms.append(
                    F.binary_cross_entropy_with_logits(
                        logits[:, gated].float(), present[:, gated].float()
                    )
                )
        if not terms:
            return self.presence_bias.sum() * 0.0
        return torch.stack(terms).mean()

    @torch.no_grad()
    def _update_presence_stats(self, classes_of, momentum: float | None) -> None:
        """Move each cached block's per-class present / absent mean scores toward this batch's.

        A class is present in an image when at least one of its tokens is the class's
        (:func:`~pivotseg.tuning.pivots.patch_classes`); only classes with a valid pivot count.
        ``momentum`` None: a plain running mean over the batches that measured the class
        (warm-up); otherwise an EMA, started by the first measurement.
        """
        strides = self.backbone.block_strides()
        for index, (scores, valid, hw, _, _) in sorted(self._presence_cache.items()):
            slot = self._presence_slot[index]
            present = self._present(classes_of(hw, strides[index])) & valid[None]  # (B, K)
            absent = ~present & valid[None]
            # (K, 4): sums and counts of present and absent scores, added over processes.
            stats = torch.stack(
                [
                    (scores * present).sum(0),
                    present.sum(0).to(scores.dtype),
                    (scores * absent).sum(0),
                    absent.sum(0).to(scores.dtype),
                ],
                dim=1,
            )
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(stats)
            sums, counts = stats[:, 0::2], stats[:, 1::2]  # (K, 2): present, absent
            measured = counts > 0
            mean = sums / counts.clamp_min(1)
            seen = self.presence_seen[slot]
            if momentum is None:
                done = self._calibration_counts.setdefault(index, torch.zeros_like(counts))
                m = done / (done + 1)
                done += measured.to(done.dtype)
            else:
                m = torch.where(seen, momentum, 0.0)
            old = self.presence_stats[slot]
            self.presence_stats[slot] = torch.where(measured, m * old + (1 - m) * mean, old)
            self.presence_seen[slot] = seen | measured

    def prompt_orthogonality(self) -> torch.Tensor:
        """Mean squared cosine between different classes' mean prompts, averaged over blocks."""
        k, p = self.num_classes, self.per_class
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=self.token_class.device)
        terms = []
        for i in self.token_blocks:
            class_tokens = self.layer_tokens(i)[1 : 1 + k * p]
            means = F.normalize(class_tokens.view(k, p, -1).mean(1), dim=-1)
            terms.append((means @ means.T)[off_diagonal].pow(2).mean())
        return torch.stack(terms).mean()

    @torch.no_grad()
    def init_pivots(
        self, labels: torch.Tensor, features: dict[int, torch.Tensor] | None = None
    ) -> None:
        """Warm-up: set the pivots to class means accumulated over all calls so far.

        Run the model forward on a warm-up batch (e.g. under ``torch.no_grad()`` in eval mode)
        and call this with that batch's labels; the tokens the hooks cached are used. Repeated
        calls average over every batch given so far (methods.md: 500 source images).

        Args:
            labels: ``(B, H, W)`` labels of the batch that was just run.
            features: instead of the cache, ``{width: (B, width, h, w) map}`` of the pivot
                block of each width (:attr:`pivot_blocks`).
        """
        if not self.uses_pivots:
            return
        strides = self.backbone.block_strides()
        if features is not None:
            cache = {
                c: (m.flatten(2).transpose(1, 2), tuple(m.shape[-2:]), self.pivot_blocks[c])
                for c, m in features.items()
            }
        else:
            cache = dict(self._pivot_cache)
        if not cache:
            raise RuntimeError("dpft.init_pivots: run a forward first, or pass features")
        classes_of = self._classes_memo(labels)

        if self.presence_calibration and features is None:
            # Scores of this batch were computed with the pivots of the batches before it;
            # a running mean over the warm-up (the first batch has no pivots and adds nothing).
            self._update_presence_stats(classes_of, None)
        for c, (feat, hw, index) in cache.items():
            classes = classes_of(hw, strides[index])
            sums, counts = class_pool(feat.float(), classes, self.num_classes)
            sums, counts = sums.sum(0), counts.sum(0)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
            if c in self._init_sums:
                sums = sums + self._init_sums[c][0]
                counts = counts + self._init_sums[c][1]
            self._init_sums[c] = (sums, counts)
            self.pivot_banks[str(c)].set_means(sums, counts)
        self._pivot_cache.clear()
        self._presence_cache.clear()

    def warm_up(self, labels: torch.Tensor) -> None:
        """The engine's warm-up step after a no-grad forward of a source batch: pivots (class
        means over all warm-up batches) and presence calibration (their running mean)."""
        self.init_pivots(labels)

    def adaptable_parameters(self):
        # SPL mode (pivotseg.tasks.adapt): the small dynamic parts, i.e. the prompt bank E_l,
        # the context MLP U and the per-layer gamma; W_q/W_k, the MLPs and the presence
        # calibration stay as trained.
        return self.named_with_prefix("tokens_", "context.", "gamma")

    def cached_pivot_tokens(self) -> dict[int, tuple[torch.Tensor, tuple[int, int], int]]:
        """Width -> (pivot-block tokens ``(B, N, c)`` before its PFF update, token grid, block)
        of the last forward; SPL mode moves the pivots toward target features with them."""
        return dict(self._pivot_cache)

    def param_group_rules(self) -> list[Rule]:
        # Rein's recipe extended: no decay on prompts and per-layer scales; the presence
        # calibration neither decays nor waits for the slow base rate (PRESENCE_LR_MULT).
        return [
            ("tuning.tokens_", dict(NO_DECAY)),
            ("tuning.gamma", dict(NO_DECAY)),
            ("tuning.presence_", {"lr_mult": PRESENCE_LR_MULT, "decay_mult": 0.0}),
        ]


def _zero_output_mlp(dim: int, hidden: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def _resolve_blocks(blocks, num_blocks: int, setting: str) -> list[int]:
    """Sorted distinct block indices; negative ones count from the end."""
    listed = isinstance(blocks, (list, tuple)) and all(isinstance(i, int) for i in blocks)
    if not listed or not blocks or any(not -num_blocks <= i < num_blocks for i in blocks):
        raise ConfigError(
            f"dpft: {setting} {blocks!r} must be a list of blocks in [-{num_blocks}, "
            f"{num_blocks - 1}] (the backbone has {num_blocks}); fix it or leave it unset"
        )
    return sorted({i % num_blocks for i in blocks})
