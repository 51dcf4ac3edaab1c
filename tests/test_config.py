"""Config: presets load, overrides apply, bad keys and types fail with the key named."""
import pytest

from codraft.config import Config, ConfigError
from codraft.configfile import config_from_toml, load_config, preset_names, to_dict, write_config


def test_presets_resolve():
    assert {"default", "smoke"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_override_sets_typed_value():
    cfg = load_config("smoke", overrides=["grpo.lr=3e-4", "rollout.group_size=6", "task.name=countdown", "grpo.betas=[0.8, 0.9]"])
    assert cfg.grpo.lr == 3e-4
    assert cfg.rollout.group_size == 6
    assert cfg.task.name == "countdown"
    assert cfg.grpo.betas == (0.8, 0.9)


def test_int_is_accepted_for_float():
    assert load_config("smoke", overrides=["grpo.lr=1"]).grpo.lr == 1.0


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo.clip_hgh'.*'clip_high'"):
        load_config("smoke", overrides=["grpo.clip_hgh=0.3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rolout'.*'rollout'"):
        load_config("smoke", overrides=["rolout.group_size=3"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[grpo]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'grpo.learning_rate'"):
        load_config("smoke", path=path)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'rollout.group_size' expects int, got 'many'"):
        load_config("smoke", overrides=["rollout.group_size=many"])
    with pytest.raises(ConfigError, match=r"'grpo.behavior_logprobs' expects one of 'recompute', 'engine'"):
        load_config("smoke", overrides=["grpo.behavior_logprobs=old"])


@pytest.mark.parametrize(
    "override, key",
    [("drafter.num_speculative_tokens=0", "drafter.num_speculative_tokens"), ("grpo.lr=-1e-4", "grpo.lr"), ("rollout.group_size=1", "rollout.group_size"),
     ("drafter.warmup_prompts=0", "drafter.warmup_prompts")],
)
def test_out_of_range_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("smoke", overrides=[override])


def test_bad_override_shape_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("smoke", overrides=["grpo.lr"])
    with pytest.raises(ConfigError, match="unknown preset 'smok'.*'smoke'"):
        load_config("smok")
    with pytest.raises(ConfigError, match="is a section"):
        load_config("smoke", overrides=["grpo=1"])


def test_written_config_round_trips(tmp_path):
    cfg = load_config("smoke", overrides=["run.seed=7", "controller.args.n=2"])
    write_config(cfg, tmp_path / "config.toml")
    again = config_from_toml(tmp_path / "config.toml")
    assert again == cfg
    assert to_dict(again)["controller"]["args"] == {"n": 2}


def test_a_run_written_before_a_field_existed_resumes_with_the_value_it_ran_with(tmp_path):
    """A run's config.toml without `controller.gate_margin` gated strictly (margin 0): reading it back
    for --resume must not give it today's default (0.05), and the field the file has is kept."""
    from codraft.commands import RunArgs, resume_config
    from codraft.config import ADDED_FIELDS

    write_config(load_config("smoke", overrides=["controller.gate_margin=0.1", "controller.gate_steps=3"]), tmp_path / "config.toml")
    assert (config_from_toml(tmp_path / "config.toml").controller.gate_margin, config_from_toml(tmp_path / "config.toml").controller.gate_steps) == (0.1, 3)
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text("\n".join(line for line in text.splitlines() if not line.startswith(("gate_margin", "gate_steps"))))
    old = config_from_toml(tmp_path / "config.toml")
    assert (old.controller.gate_margin, old.controller.gate_steps) == (ADDED_FIELDS["controller.gate_margin"], ADDED_FIELDS["controller.gate_steps"]) == (0.0, 1)
    assert load_config("smoke").controller.gate_margin == 0.05  # the default a new run gets
    resumed = resume_config(RunArgs(resume=tmp_path, set=["run.steps=9"]))
    assert resumed.controller.gate_margin == 0.0 and resumed.run.steps == 9


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("smoke", path="/nonexistent/x.toml")


def test_presets_inherit_and_cycles_are_refused(monkeypatch, tmp_path):
    from codraft import configfile

    default, drift, explore = (load_config(p) for p in ("default", "drift", "drift-explore"))
    assert drift.task.mix_start == 100000 and drift.drafter == default.drafter and drift.grpo == default.grpo
    assert explore.grpo.entropy_coef > 0 and explore.rollout.temperature > 1 and explore.task.mix_start == 100000
    (tmp_path / "a.toml").write_text('inherit = "b"\n')
    (tmp_path / "b.toml").write_text('inherit = "a"\n')
    monkeypatch.setattr(configfile, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        load_config("a")
