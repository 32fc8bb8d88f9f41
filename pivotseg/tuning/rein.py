"""``rein``: Rein ("Stronger, Fewer & Superior", CVPR 2024), the released ``LoRAReins`` variant.

After every block ``i`` the patch tokens ``f (B, N, c)`` (class/register tokens excluded) are
refined by ``m`` learnable tokens ``T_i = A_i B_i`` (``A_i (m, r)``, ``B_i (r, c)``)::

    S      = softmax(f T_i^T / sqrt(c))                  # (B, N, m)
    dfbar  = S[:, :, 1:] @ MLP_T(T_i[1:])                # token 0 is a null/sink token
    f      = f + s * MLP_D(dfbar + f)                    # s: one learnable scalar, init 1e-3

``MLP_T`` (``mlp_token2feat``) and ``MLP_D`` (``mlp_delta_f``) are single ``c x c`` Linear
layers shared by all blocks, as in the released code (the paper describes per-layer MLPs; the
shared ones give the published 2.99M). Queries for Mask2Former (:meth:`queries`): every layer's
tokens go through ``W_t`` (``transform``, Linear ``c -> q``); max over layers, mean over layers
and the last layer are combined per token and per channel, and ``merge`` (Linear ``3q -> q``)
gives ``(m, q)``. The three pooled values are interleaved channel by channel before ``merge``
(``[max_0, avg_0, last_0, max_1, ...]``), which is the layout of Rein's ``merge`` weight.

Trainable parameters for DINOv2-L (24 blocks, c = 1024), m = 100, r = 16, q = 256::

    tokens_a  24 x 100 x 16                 38,400
    tokens_b  24 x 16 x 1024               393,216
    scale                                        1
    mlp_token2feat  1024 x 1024 + 1024   1,049,600
    mlp_delta_f     1024 x 1024 + 1024   1,049,600
    transform       1024 x 256 + 256       262,400
    merge           768 x 256 + 256        196,864
    total                                2,990,081

Initialisation as released: tokens uniform in ``+-sqrt(6 / (3 p^2 + sqrt(c r)))`` with ``p`` the
patch size; Linear layers PyTorch's default (Rein's explicit kaiming call is that default).

Generalisation to hierarchical backbones (ours): blocks may differ in width (TinyViT 128/160/320).
Tokens are per block at that block's width; ``MLP_T``, ``MLP_D`` and ``W_t`` are shared among the
blocks of equal width (one per distinct width, keyed by the width: ``mlp_token2feat.1024``); the
scale and ``merge`` stay single. For a uniform-width ViT this is exactly Rein.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.tuning.base import TUNING_PREFIX, Rule, TuningMethod

NO_DECAY = {"lr_mult": 1.0, "decay_mult": 0.0}


def distinct(values):
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


class TokenMethod(TuningMethod):
    """Shared machinery of Rein and DPFT: low-rank tokens per block, shared MLPs, query link.

    Subclasses set the token count before calling :meth:`build_tokens` and implement
    :meth:`update` (the per-block feature refinement); their constructors take ``query_dim``
    and ``link_queries``.
    """

    provides_queries = True

    def build_tokens(
        self,
        num_tokens: int,
        rank: int,
        query_dim: int,
        link_queries: bool,
        blocks: list[int] | None = None,
    ) -> None:
        """Tokens, MLPs and query link for ``blocks`` (sorted block indices; None = all)."""
        self.require_blocks()
        self.token_blocks = list(range(self.backbone.num_blocks)) if blocks is None else blocks
        self._token_slot = {block: slot for slot, block in enumerate(self.token_blocks)}
        dims = [self.backbone.block_dims[i] for i in self.token_blocks]
        self.num_tokens = num_tokens
        self.widths = distinct(dims)
        self.tokens_a = nn.ParameterList(nn.Parameter(torch.empty(num_tokens, rank)) for _ in dims)
        self.tokens_b = nn.ParameterList(nn.Parameter(torch.empty(rank, c)) for c in dims)
        patch = self.backbone.patch_size
        for a, b, c in zip(self.tokens_a, self.tokens_b, dims):
            bound = math.sqrt(6.0 / (3 * patch * patch + math.sqrt(c * rank)))
            nn.init.uniform_(a, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.mlp_token2feat = nn.ModuleDict({str(c): nn.Linear(c, c) for c in self.widths})
        self.mlp_delta_f = nn.ModuleDict({str(c): nn.Linear(c, c) for c in self.widths})
        self.link_queries = link_queries
        if link_queries:
            self.transform = nn.ModuleDict({str(c): nn.Linear(c, query_dim) for c in self.widths})
            self.merge = nn.Linear(3 * query_dim, query_dim)
            self.num_queries = num_tokens

    def named_with_prefix(self, *prefixes: str):
        """``(full name, parameter)`` of this method's parameters whose names start so."""
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                yield TUNING_PREFIX + name, param

    def layer_tokens(self, index: int) -> torch.Tensor:
        """``T_i = A_i B_i``, ``(m, c)``, of block ``index`` (one of :attr:`token_blocks`)."""
        slot = self._token_slot[index]
        return self.tokens_a[slot] @ self.tokens_b[slot]

    def attach(self, backbone: Backbone) -> None:
        backbone.freeze()
        for i in self.token_blocks:
            self.add_hook(i, partial(self._hook, i))

    def _hook(self, index: int, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.update(index, tokens, hw)

    def update(self, index: int, f: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def queries(self) -> torch.Tensor | None:
        if not self.link_queries:
            return None
        dims = self.backbone.block_dims
        per_layer = torch.stack(
            [self.transform[str(dims[i])](self.layer_tokens(i)) for i in self.token_blocks], dim=-1
        )  # (m, q, L)
        pooled = torch.stack(
            [per_layer.amax(-1), per_layer.mean(-1), per_layer[..., -1]], dim=-1
        )  # (m, q, 3), flattened channel-major as Rein's merge expects
        return self.merge(pooled.flatten(-2))


class Rein(TokenMethod):
    """Rein (``LoRAReins``) on any backbone with blocks.

    Args:
        backbone: the backbone (frozen on attach).
        num_classes: unused (Rein is class-agnostic).
        num_tokens: m, tokens per block (token 0 is the null token).
        rank: r of ``T_i = A_i B_i``.
        query_dim: width of :meth:`queries`.
        scale_init: initial value of the shared scale s.
        link_queries: build ``transform``/``merge`` and return queries (Rein's
            ``link_token_to_query``); turn off for heads without queries.
    """

    name = "rein"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        num_tokens: int = 100,
        rank: int = 16,
        query_dim: int = 256,
        scale_init: float = 1e-3,
        link_queries: bool = True,
    ):
        super().__init__(
            backbone,
            num_classes,
            num_tokens=num_tokens,
            rank=rank,
            query_dim=query_dim,
            scale_init=scale_init,
            link_queries=link_queries,
        )
        self.build_tokens(num_tokens, rank, query_dim, link_queries)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def update(self, index: int, f: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        c = f.shape[-1]
        tokens = self.layer_tokens(index).to(f.dtype)
        attn = F.softmax(f @ tokens.T * c**-0.5, dim=-1)
        delta = attn[..., 1:] @ self.mlp_token2feat[str(c)](tokens[1:])
        delta = self.mlp_delta_f[str(c)](delta + f)
        return f + self.scale * delta

    def param_group_rules(self) -> list[Rule]:
        # Rein's recipe: no decay on the learnable tokens and on the scale.
        return [("tuning.tokens_", dict(NO_DECAY)), ("tuning.scale", dict(NO_DECAY))]

    def adaptable_parameters(self):
        # Test-time self-training: the tokens and the scale decide how features are refined;
        # the shared MLPs and the query link stay as trained on the source.
        return self.named_with_prefix("tokens_", "scale")
