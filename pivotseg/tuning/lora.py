"""``lora``: low-rank adapters on the attention projections, injected with peft.

The projections are found in the model rather than named in advance: every ``nn.Linear`` inside
``backbone.blocks`` whose own (leaf) name is one of :data:`ROLE_NAMES` for the requested roles
(default ``("q", "v")``, as in the LoRA paper). Names differ between models and between
transformers majors (DINOv2 in transformers 5 uses ``q_proj``/``v_proj``, 4.x used
``query``/``value``). A block with a fused projection (``qkv``, as in TinyViT and SAM) and no
separate q/v gets one adapter on the fused layer instead. Only blocks that a forward at the
backbone's ``out_indices`` runs are adapted, and a probe forward checks that every adapter is
reached: a model that uses a layer's weight without calling the module (``F.linear(x,
q_proj.weight)``, as pivotseg's EVA02 does) gets a ConfigError rather than adapters that never
train.

peft's ``inject_adapter_in_model`` replaces each target by a ``lora.Linear`` wrapper inside the
backbone (the base weight moves to ``<name>.base_layer.weight``), and the backbone is frozen
except for ``lora_A``/``lora_B``. Block hooks keep working because the blocks themselves are not
replaced. With ``dropout > 0`` the adapters' dropout follows the method's train/eval mode even
though the frozen backbone stays in eval mode.
"""

from __future__ import annotations

from torch import nn

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError
from pivotseg.tuning.base import TuningMethod, probe_forward

# Leaf names of attention projections per role, across the model families we wrap.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "q", "to_q", "q_lin"),
    "k": ("k_proj", "key", "k", "to_k", "k_lin"),
    "v": ("v_proj", "value", "v", "to_v", "v_lin"),
    "o": ("o_proj", "out_proj", "to_out", "out_lin"),
    "qkv": ("qkv", "qkv_proj", "in_proj", "Wqkv"),
}


def block_prefixes(backbone: Backbone, last: int | None = None) -> list[str]:
    """Module names of ``backbone.blocks[: last + 1]`` (all blocks when ``last`` is None)."""
    blocks = backbone.blocks if last is None else backbone.blocks[: last + 1]
    names = {id(blk): n for n, blk in backbone.named_modules()}
    return [names[id(blk)] for blk in blocks]


def find_projections(backbone: Backbone, roles=("q", "v"), last: int | None = None) -> list[str]:
    """Module names (relative to the backbone) of the Linear layers to adapt.

    Args:
        backbone: the backbone whose blocks are searched.
        roles: keys of :data:`ROLE_NAMES`.
        last: search blocks ``0 .. last`` only (default all).

    Raises:
        ConfigError: a role is unknown, or no block holds a matching Linear layer.
    """
    unknown = [r for r in roles if r not in ROLE_NAMES]
    if unknown:
        raise ConfigError(f"lora: unknown targets {unknown}; known: {', '.join(ROLE_NAMES)}")
    found = []
    for prefix in block_prefixes(backbone, last):
        block = backbone.get_submodule(prefix)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

        def with_leaf(leaves, linears=linears):
            return [n for n in linears if n.rsplit(".", 1)[-1] in leaves]

        names = [n for role in roles for n in with_leaf(ROLE_NAMES[role])]
        if not names and {"q", "k", "v"} & set(roles):
            names = with_leaf(ROLE_NAMES["qkv"])
        found += [f"{prefix}.{n}" for n in names]
    if not found:
        raise ConfigError(
            f"lora: no attention projections ({'/'.join(roles)}) found in the blocks of "
            f"{backbone.name!r}; set target_modules to Linear names, or use frozen/full"
        )
    return found


class LoRA(TuningMethod):
    """LoRA adapters on the attention projections of every block.

    Args:
        backbone: any backbone with blocks.
        num_classes: unused (common builder signature).
        rank: adapter rank r.
        alpha: scaling numerator (update scale ``alpha / rank``).
        dropout: dropout on the adapter input.
        targets: projection roles to adapt, keys of :data:`ROLE_NAMES`.
        target_modules: explicit leaf names of Linear layers inside the blocks (overrides
            ``targets``), e.g. ``["q_proj", "k_proj", "v_proj"]``.
    """

    name = "lora"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] | tuple[str, ...] = ("q", "v"),
        target_modules: list[str] | None = None,
    ):
        super().__init__(
            backbone,
            num_classes,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=list(targets),
            target_modules=target_modules,
        )
        if rank < 1:
            raise ConfigError(f"lora: rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets, self.target_modules = tuple(targets), target_modules
        self.module_names: list[str] = []

    def _resolve_targets(self, backbone: Backbone) -> list[str]:
        # Blocks after the deepest output never run: adapters there would get no gradient.
        last = self.last_run_block()
        if self.target_modules is None:
            return find_projections(backbone, self.targets, last)
        wanted = set(self.target_modules)
        names = []
        for prefix in block_prefixes(backbone, last):
            names += [
                f"{prefix}.{n}"
                for n, m in backbone.get_submodule(prefix).named_modules()
                if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
            ]
        if not names:
            raise ConfigError(
                f"lora: target_modules {self.target_modules} match no Linear layer in the blocks "
                f"of {backbone.name!r}"
            )
        return names

    def attach(self, backbone: Backbone) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.require_lora_blocks(backbone)
        self.module_names = self._resolve_targets(backbone)
        backbone.freeze()
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.module_names,
            bias="none",
        )
        inject_adapter_in_model(config, backbone)
        adapters = []
        for name, param in backbone.named_parameters():
            param.requires_grad_(".lora_A." in name or ".lora_B." in name)
            if param.requires_grad:
                adapters.append(name)
        used, _ = probe_forward(backbone)
        bypassed = sorted({n.split(".lora_")[0] for n in adapters if n not in used})
        if bypassed:
            raise ConfigError(
                f"lora: {backbone.name}'s forward bypasses the adapted layers (e.g. "
                f"{bypassed[0]}: it uses their weights without calling the module), so the "
                "adapters would never train; use rein/dpft/full, or target other modules"
            )
        if self.dropout > 0:
            self._handles.append(backbone.register_forward_pre_hook(self._sync_dropout))

    def require_lora_blocks(self, backbone: Backbone) -> None:
        if not backbone.blocks:
            raise ConfigError(
                f"lora needs transformer blocks; {backbone.name} has none; use frozen/full"
            )

    def _sync_dropout(self, module, args):
        # The frozen backbone forces eval mode on its children; adapter dropout follows us.
        for name, sub in self.backbone.named_modules():
            if name.endswith("lora_dropout"):
                sub.train(self.training)
