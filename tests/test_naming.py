"""pivotseg.naming: close-name suggestions and keyword settings checked against a constructor,
and the registries (heads, tuning methods, dataset formats) that use them."""

from __future__ import annotations

import pytest

from pivotseg.data.formats import get_format
from pivotseg.errors import ConfigError
from pivotseg.heads import build_head
from pivotseg.naming import accepted_kwargs, check_kwargs, closest, hint
from pivotseg.tuning import build_method, method_options


class Takes:
    def __init__(self, backbone, rank: int = 4, *args, scale: float = 1.0, **kwargs):
        pass


def scaled(x, factor=2):
    return x * factor


def test_closest_finds_a_typo_and_nothing_far_away():
    assert closest("rnk", ["rank", "scale"]) == "rank"
    assert closest("zzz", ["rank", "scale"]) is None
    # "lrr" is 0.8 from "lr": the cutoff decides.
    assert closest("lrr", ["lr"], cutoff=0.9) is None
    assert closest("lrr", ["lr"], cutoff=0.5) == "lr"


def test_hint_suggests_or_lists():
    assert hint("rnk", ["rank", "scale"]) == "did you mean 'rank'?"
    assert hint("zzz", ["rank", "scale"]) == "known: rank, scale"
    assert hint("zzz", ["rank", "scale"], listing="valid") == "valid: rank, scale"
    assert hint("lrr", ["lr", "seed"], quote=False, prefix="train.") == "did you mean train.lr?"


def test_accepted_kwargs_leave_out_self_variadics_and_skipped_names():
    assert accepted_kwargs(Takes) == ["backbone", "rank", "scale"]
    assert accepted_kwargs(Takes, skip=("backbone",)) == ["rank", "scale"]
    assert accepted_kwargs(scaled) == ["x", "factor"]


def test_check_kwargs_refuses_the_first_unknown_key_in_one_line():
    check_kwargs({"rank": 8, "scale": 0.5}, Takes, where="model.method_args", owner="x")
    with pytest.raises(ConfigError) as err:
        check_kwargs(
            {"rank": 8, "rnk": 8}, Takes, where="model.method_args", owner="method 'x'",
            skip=("backbone",),
        )  # fmt: skip
    assert str(err.value) == (
        "model.method_args: method 'x' has no setting 'rnk'; did you mean 'rank'? "
        "settings: rank, scale"
    )
    with pytest.raises(ConfigError) as err:
        check_kwargs({"backbone": 1}, Takes, where="w", owner="o", skip=("backbone",))
    assert str(err.value) == "w: o has no setting 'backbone'; settings: rank, scale"
    with pytest.raises(ConfigError, match="settings: none$"):
        check_kwargs({"mode": 1}, lambda: None, where="w", owner="o")


def test_registries_share_the_wording():
    with pytest.raises(ConfigError) as err:
        build_head("fpn", [8] * 4, [16] * 4, 3, chanels=16)
    assert str(err.value).startswith(
        "model.head_args: head 'fpn' has no setting 'chanels'; did you mean 'channels'? settings: "
    )
    assert "in_dims" not in str(err.value)  # passed by build_head, not a user setting
    with pytest.raises(ConfigError) as err:
        build_method("rein", None, 3, rnk=4)  # refused before the backbone is touched
    assert str(err.value) == (
        "model.method_args: method 'rein' has no setting 'rnk'; did you mean 'rank'? "
        f"settings: {', '.join(method_options('rein'))}"
    )
    assert "backbone" not in method_options("rein") and "rank" in method_options("rein")
    with pytest.raises(ConfigError, match="unknown tuning method 'reins'; did you mean 'rein'"):
        build_method("reins", None, 3)
    with pytest.raises(ConfigError) as err:
        get_format("camvid", condition="fog")
    assert str(err.value) == "dataset options: format 'camvid' has no setting 'condition'; " + (
        "settings: none"
    )
    assert get_format("acdc", condition="fog").condition == "fog"
