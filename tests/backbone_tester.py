"""Checks every backbone must pass, run over tiny random configs (transformers' tester style).

A test module subclasses :class:`BackboneTester`, sets ``name`` and ``tiny_config`` (and, where
needed, ``build_kwargs`` and ``sizes``), and pytest collects the shared ``test_*`` methods.
"""

from __future__ import annotations

import torch

from pivotseg.backbones import build_backbone
from pivotseg.backbones.base import Backbone


class BackboneTester:
    name: str = ""
    tiny_config: dict = {}
    build_kwargs: dict = {}
    # Two input sizes, each a multiple of the backbone's size divisor.
    sizes: tuple[tuple[int, int], tuple[int, int]] = ((64, 64), (64, 96))
    has_blocks: bool = True

    def build(self, **kw) -> Backbone:
        return build_backbone(
            self.name, config=dict(self.tiny_config), **{**self.build_kwargs, **kw}
        )

    def test_forward_two_sizes_and_levels(self):
        bb = self.build().eval()
        for h, w in self.sizes:
            feats = bb(torch.randn(2, 3, h, w))
            assert len(feats) == len(bb.out_indices)
            for f, c, s in zip(feats, bb.out_dims, bb.out_strides):
                assert f.shape == (2, c, h // s, w // s), (f.shape, c, s)
                assert torch.isfinite(f).all()

    def test_rejects_bad_size(self):
        bb = self.build().eval()
        h = bb.size_divisor * 4 + 1
        try:
            bb(torch.randn(1, 3, h, h))
        except ValueError as err:
            assert "multiple" in str(err)
        else:
            raise AssertionError("input of a non-multiple size was accepted")

    def test_block_hook_changes_output(self):
        bb = self.build().eval()
        if not self.has_blocks:
            assert bb.blocks == []
            return
        assert len(bb.block_dims) == len(bb.blocks)
        x = torch.randn(1, 3, *self.sizes[0])
        ref = bb(x)[-1]
        seen = {}

        def fn(tokens, hw):
            seen["shape"], seen["hw"] = tokens.shape, hw
            return tokens + 1.0

        handle = bb.add_block_hook(0, fn)
        out = bb(x)[-1]
        handle.remove()
        assert seen["shape"][0] == 1 and seen["shape"][1] == seen["hw"][0] * seen["hw"][1]
        assert seen["shape"][2] == bb.block_dims[0]
        assert not torch.allclose(out, ref)
        assert torch.allclose(bb(x)[-1], ref, atol=1e-6)  # removed hook leaves no trace

    def test_freeze_keeps_parameters_and_eval_mode(self):
        bb = self.build()
        bb.freeze()
        bb.train()
        assert all(not m.training for m in bb.modules() if m is not bb)
        probe = torch.nn.Parameter(torch.zeros(()))
        before = {k: v.clone() for k, v in bb.state_dict().items()}
        opt = torch.optim.SGD([probe, *bb.parameters()], lr=1.0)
        loss = sum(f.mean() for f in bb(torch.randn(1, 3, *self.sizes[0]))) + probe
        loss.backward()
        opt.step()
        for k, v in bb.state_dict().items():
            assert torch.equal(v, before[k]), k

    def test_save_load_round_trip(self, tmp_path):
        bb = self.build().eval()
        x = torch.randn(1, 3, *self.sizes[1])
        ref = bb(x)
        bb.save_pretrained(tmp_path / "bb")
        again = build_backbone(source=tmp_path / "bb").eval()
        for a, b in zip(ref, again(x)):
            torch.testing.assert_close(a, b)
