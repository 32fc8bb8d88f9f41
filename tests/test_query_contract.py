"""The method <-> head contract, declared on the base classes: which methods provide queries,
the query settings build_segmenter passes, the refused head_args.num_queries, prepare_batch."""

from __future__ import annotations

import inspect

import pytest
import torch

from pivotseg.errors import ConfigError
from pivotseg.heads import HEADS
from pivotseg.segmenter import build_segmenter, load_segmenter
from pivotseg.tuning import METHODS
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, tiny_vit_config


def model_dict(method: str, head: str, **head_args) -> dict:
    return {
        "num_classes": 3,
        "backbone": "dinov2",
        "backbone_config": tiny_vit_config(),
        "method": method,
        "method_args": dict(TINY_METHOD_ARGS[method]),
        "head": head,
        "head_args": {**TINY_HEAD_ARGS[head], **head_args},
    }


def test_declared_query_providers_are_the_methods_with_query_settings():
    for name, cls in METHODS.items():
        takes = set(inspect.signature(cls).parameters)
        assert cls.provides_queries == ({"query_dim", "link_queries"} <= takes), name
    assert {n for n, c in METHODS.items() if c.provides_queries} == {"rein", "dpft"}
    assert {n for n, c in HEADS.items() if c.accepts_queries} == {"mask2former"}
    assert HEADS["mask2former"].query_dim({}) == 256  # the head's default hidden_dim
    assert HEADS["mask2former"].query_dim({"hidden_dim": 64}) == 64


def test_query_settings_follow_the_head():
    linked = build_segmenter(model_dict("rein", "mask2former"), seed=0)
    assert linked.tuning.config()["query_dim"] == 64 and linked.tuning.link_queries
    assert linked.head.uses_queries and linked.tuning.queries().shape == (6, 64)
    unlinked = build_segmenter(model_dict("dpft", "fpn"), seed=0)
    assert unlinked.tuning.config()["link_queries"] is False
    assert unlinked.tuning.queries() is None and unlinked.tuning.num_queries == 0


def test_a_num_queries_the_method_overrides_is_refused():
    # Rein's 6 tokens are the head's queries: 7 learnt queries would be silently ignored.
    with pytest.raises(ConfigError) as err:
        build_segmenter(model_dict("rein", "mask2former", num_queries=7), seed=0)
    message = str(err.value)
    assert message.startswith("model.head_args.num_queries=7 is unused") and "\n" not in message
    assert "remove num_queries from model.head_args (or set it to 6)" in message
    # DPFT's queries: 1 + 3 classes x 2 + 8 generic tokens.
    with pytest.raises(ConfigError, match="set it to 15"):
        build_segmenter(model_dict("dpft", "mask2former", num_queries=6), seed=0)
    # Learnt queries (no link, or the link declined) use the head's count: nothing to refuse.
    assert build_segmenter(model_dict("frozen", "mask2former", num_queries=7), seed=0)
    own = build_segmenter(
        model_dict("rein", "mask2former", num_queries=7, external_queries=False), seed=0
    )
    assert not own.head.uses_queries


def test_checkpoints_saved_with_an_unused_num_queries_still_load(tmp_path):
    cfg = model_dict("rein", "mask2former", num_queries=7)
    saved = build_segmenter(cfg, seed=0, strict=False).eval()
    saved.save(tmp_path / "ckpt")
    loaded = load_segmenter(tmp_path / "ckpt")
    assert loaded.config.head_args["num_queries"] == 7  # the file is read as written
    images = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), saved(images))


def test_prepare_batch_sees_the_labels_of_training_steps_only():
    model = build_segmenter(model_dict("frozen", "fpn"), seed=0)
    seen = []
    model.tuning.prepare_batch = seen.append
    images, labels = torch.rand(2, 3, 32, 32) * 255, torch.randint(0, 3, (2, 32, 32))
    model.train().compute_loss(images, labels)
    assert len(seen) == 1 and seen[0] is labels
    model.eval().compute_loss(images, labels)
    assert len(seen) == 1
