from dataclasses import dataclass, field
from typing import Literal

import pytest

from jobs.config import ConfigError, apply_overrides, from_dict, load, parse_value, to_dict


@dataclass
class Optim:
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    fp8: bool = False
    optim: Optim = field(default_factory=Optim)
    weights: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def test_defaults_and_nested_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\n[optim]\nlr = 1e-3\n')
    cfg = load(Cfg, p, ["steps=20", "optim.schedule=linear", "weights.uniref=0.5", "fp8=true"])
    assert cfg.name == "x" and cfg.steps == 20 and cfg.fp8 is True
    assert cfg.optim.lr == 1e-3 and cfg.optim.schedule == "linear"
    assert cfg.weights == {"uniref": 0.5}
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict(Optim, {"lr": 1}).lr == 1.0


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"stepz": 3}, "unknown config key 'stepz'.*did you mean 'steps'"),
        ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
        ({"steps": "ten"}, "config key 'steps': 'ten' is not an integer"),
        ({"steps": 1.5}, "config key 'steps': 1.5 is not an integer"),
        ({"fp8": 1}, "config key 'fp8': 1 is not true or false"),
        (
            {"optim": {"schedule": "step"}},
            "'optim.schedule': 'step' is not one of 'cosine', 'linear'",
        ),
        ({"optim": {"betas": [0.9, "a"]}}, r"'optim.betas\[1\]': 'a' is not a number"),
        ({"optim": 3}, "'optim': 3 is not a table"),
    ],
)
def test_bad_keys_and_values_are_one_clear_line(data, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        from_dict(Cfg, data)
    assert "\n" not in str(e.value)


def test_override_syntax():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="'steps' is not a table"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Cfg, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(Cfg, bad)
