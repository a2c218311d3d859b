from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from dd2cli.config import (
    DEFAULT_SOURCE,
    config_layers,
    describe,
    from_dict,
    load_settings,
    parse_override,
    resolve_layers,
    setting,
    to_dict,
)
from dd2cli.errors import ConfigError


@dataclass
class Inner:
    lr: float = setting(1e-4, "learning rate")
    steps: int = setting(100, "number of steps")
    kind: Literal["uniform", "logit-normal"] = setting("uniform", "timestep distribution")


@dataclass
class Outer:
    name: str = setting("run", "a name")
    flag: bool = setting(False, "a switch")
    sizes: tuple[int, ...] = setting((1, 2), "a tuple")
    maybe: Optional[float] = setting(None, "optional")
    stage: Inner = setting(Inner(), "nested")


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "from-file"\n[stage]\nlr = 3e-4\nsteps = 7\n')
    s = load_settings(Outer, cfg, ["stage.steps=9", "stage.kind=logit-normal", "sizes=[4, 5]"],
                      base={"flag": True, "stage": {"lr": 1.0}})
    assert s.name == "from-file" and s.flag is True
    assert s.stage.lr == 3e-4 and s.stage.steps == 9 and s.stage.kind == "logit-normal"
    assert s.sizes == (4, 5)
    assert from_dict(Outer, to_dict(s)) == s  # the saved form round-trips


def test_each_value_is_traced_to_the_last_layer_that_set_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "from-file"\n[stage]\nlr = 3e-4\n')
    layers = [("variant", {"flag": True, "stage": {"lr": 1.0, "steps": 5}}), *config_layers(cfg, ["stage.steps=9",
                                                                                                   "flag=true"])]
    s, sources = resolve_layers(Outer, layers)
    assert s == load_settings(Outer, cfg, ["stage.steps=9", "flag=true"], base=layers[0][1])  # one resolution
    assert sources == {"name": "c.toml", "flag": "--set", "sizes": DEFAULT_SOURCE, "maybe": DEFAULT_SOURCE,
                       "stage.lr": "c.toml", "stage.steps": "--set", "stage.kind": DEFAULT_SOURCE}
    with pytest.raises(ConfigError, match="Unknown setting 'stage.lrr'"):  # an unknown key is still refused
        resolve_layers(Outer, [("--set", {"stage": {"lrr": 1}})])


def test_int_promotes_to_float_but_not_bool_to_int():
    assert load_settings(Outer, overrides=["stage.lr=1"]).stage.lr == 1.0
    with pytest.raises(ConfigError, match="'stage.steps' must be int"):
        load_settings(Outer, overrides=["stage.steps=true"])
    with pytest.raises(ConfigError, match="'stage.steps' must be int"):
        load_settings(Outer, overrides=["stage.steps=1.5"])


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ConfigError) as exc:
        load_settings(Outer, overrides=["stage.lrr=1"])
    msg = str(exc.value)
    assert "stage.lrr" in msg and "lr, steps, kind" in msg


def test_wrong_literal_and_type_errors(tmp_path):
    with pytest.raises(ConfigError, match="one of 'uniform' | 'logit-normal'"):
        load_settings(Outer, overrides=["stage.kind=cosine"])
    with pytest.raises(ConfigError, match="'stage' must be"):
        load_settings(Outer, overrides=["stage=3"])
    assert load_settings(Outer, overrides=["maybe=0.5"]).maybe == 0.5


def test_malformed_toml_is_one_sentence(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[stage\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(Outer, cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(Outer, tmp_path / "missing.toml")


def test_parse_override_forms():
    assert parse_override("a.b.c=2") == {"a": {"b": {"c": 2}}}
    assert parse_override("x=hello") == {"x": "hello"}
    assert parse_override('x="quoted"') == {"x": "quoted"}
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_describe_lists_every_leaf_with_help():
    rows = {r[0]: r for r in describe(Outer)}
    assert set(rows) == {"name", "flag", "sizes", "maybe", "stage.lr", "stage.steps", "stage.kind"}
    assert rows["stage.lr"][3] == "learning rate"


def test_stage2_cosine_decay_warms_up_then_falls_to_the_final_fraction():
    from dd2cli.engine.distill import _lr_at

    base, warm, total = 1e-3, 10, 110
    lrs = [_lr_at(i, base, warm, decay="cosine", total=total, final=0.1) for i in range(total)]
    assert lrs[0] == pytest.approx(1e-6 + (base - 1e-6) / warm)
    assert lrs[warm - 1] == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rises after warm-up
    assert lrs[warm + 49] == pytest.approx(base * (0.1 + 0.9 * 0.5))  # half way: mid-point of the cosine
    assert lrs[-1] == pytest.approx(0.1 * base)
    assert [_lr_at(i, base, warm) for i in (warm, total - 1)] == [base, base]  # "none" stays constant


def test_lr_final_outside_zero_one_is_refused():
    from dd2cli.settings import DistillSettings

    s = DistillSettings()
    s.stage2.lr_final = 1.5
    with pytest.raises(ConfigError, match="stage2.lr_final"):
        s.validate()


@pytest.mark.parametrize("text", ["stage2.lr=inf", "stage1.lr=-inf", "stage2.alpha=nan"])
def test_non_finite_numbers_are_refused_up_front(text):
    from dd2cli.settings import DistillSettings

    with pytest.raises(ConfigError, match=rf"Setting '{text.split('=')[0]}' must be a finite number"):
        load_settings(DistillSettings, None, [text])


@pytest.mark.parametrize("cores, idle, expected", [(2, 1.95, 2), (2, 1.6, 2), (2, 1.05, 1), (2, 0.0, 1),
                                                   (8, 5.8, 6), (8, 8.0, 8), (1, 1.0, 1)])
def test_auto_threads_is_one_per_idle_core(monkeypatch, cores, idle, expected):
    import os

    from dd2cli.engine import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(runtime, "_idle_cores", lambda cpus: idle if cpus == set(range(cores)) else None)
    assert runtime.resolve_threads(-1) == expected
    assert runtime.resolve_threads(3) == 3 and runtime.resolve_threads(0) == 0  # explicit counts pass through
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes on this machine share the idle cores
    assert runtime.resolve_threads(-1) == max(1, int(idle / 2 + 0.5))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # without /proc/stat: the load average stands in
    monkeypatch.setattr(runtime, "_idle_cores", lambda cpus: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - idle, 0.0, 0.0))
    assert runtime.resolve_threads(-1) == expected


def test_idle_cores_reads_this_machines_cpus():
    import os

    from dd2cli.engine.runtime import _idle_cores

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    idle = _idle_cores(cpus, interval=0.05)
    if not os.path.exists("/proc/stat"):
        assert idle is None
    else:
        assert idle is not None and 0.0 <= idle <= len(cpus) + 1e-9


def test_threads_below_minus_one_is_refused():
    from dd2cli.settings import DistillSettings

    s = DistillSettings()
    s.threads = -2
    with pytest.raises(ConfigError, match="'threads'"):
        s.validate()


def test_flow_init_with_a_backbone_generator_is_refused():
    from dd2cli.settings import DistillSettings

    s = DistillSettings()
    s.flow_init.steps = 10
    s.validate()  # with the default initialisation it is fine
    s.stage2.init_generator = "backbone"
    with pytest.raises(ConfigError, match="flow_init.steps > 0 trains the generator's initialisation"):
        s.validate()
    s.stage2.init_generator = "ar-diffusion"
    s.flow_init.euler_steps = 0
    with pytest.raises(ConfigError, match="flow_init.euler_steps"):
        s.validate()
