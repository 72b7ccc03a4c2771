import json

import pytest

from fastdmd.config import ConfigError, help_text, parse_args, to_dict


def test_defaults_come_from_the_digits_recipe():
    cfg = parse_args([])
    assert cfg.recipe == "digits-dmd2" and cfg.method == "dmd2"
    assert cfg.dmd.generator_sigmas == (1.0, 0.75, 0.5, 0.25)


def test_dotted_overrides_and_flags():
    cfg = parse_args(["--trainer.steps", "7", "--dmd.guidance_scale=1.5", "--resume", "--run_dir", "x",
                      "--dmd.generator_sigmas", "1,0.5"])
    assert cfg.trainer.steps == 7 and cfg.dmd.guidance_scale == 1.5 and cfg.resume
    assert cfg.dmd.generator_sigmas == (1.0, 0.5)


def test_config_file_then_cli(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nsteps = 11\nbatch_size = 8\n")
    cfg = parse_args(["--config", str(path), "--trainer.steps", "12"])
    assert cfg.trainer.batch_size == 8 and cfg.trainer.steps == 12


@pytest.mark.parametrize("argv, message", [
    (["--trainer.stepz", "3"], "unknown config key 'trainer.stepz'"),
    (["--nosuch", "3"], "unknown config key 'nosuch'"),
    (["--trainer.steps", "ten"], "trainer.steps = 'ten' has the wrong type; expected an integer"),
    (["--trainer.steps", "0"], "trainer.steps = 0 is out of range; it must be >= 1"),
    (["--trainer.adam_beta1", "1.5"], "it must be <= 0.999"),
    (["--profile.trace", "true", "--trainer.steps", "4"],
     "the profiled steps 3..5 (profile.start, profile.steps) run past trainer.steps = 4"),
    (["--trainer.lr_generator", "nan"], "trainer.lr_generator = nan is not a finite number"),
    (["--dmd.generator_sigmas", "1,inf"], "dmd.generator_sigmas = inf is not a finite number"),
    (["--ops.backend", "cuda"], "choose one of ['auto', 'triton', 'reference', 'native']"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--dmd.sigma_min", "0.99"], "must be below dmd.sigma_max"),
    (["--dmd.generator_sigmas", "0.5,0.75"], "strictly decreasing"),
    (["--eval.at_end", "maybe"], "expected true or false"),
    (["--trainer", "3"], "is a section"),
    (["positional"], "unexpected argument 'positional'"),
    (["--recipe", "digits-rtdmd", "--trainer.critic_samples", "fresh"], "trainer.critic_samples = 'fresh' draws a random"),
    (["--recipe", "digits-drpo", "--model.init_generator", "runs/dmd2", "--trainer.critic_samples", "fresh_last"],
     "method drpo has no critic"),
    (["--recipe", "digits-rtdmd", "--reward.names", "distribution_matching"],
     "reward distribution_matching (R_dm) reads the DMD statistics of the samples it scores, which method rtdmd"),
    (["--recipe", "digits-dmdr", "--reward.names", "jpeg"],
     "method dmdr backpropagates through the reward (its reward loss), but reward ['jpeg'] is not differentiable; "
     "choose from ['classifier_log_prob', 'clip_score', 'pickscore', 'hpsv2']"),
    (["--recipe", "digits-rtdmd", "--reward.names", "classifier_log_prob,jpeg"],
     "method rtdmd backpropagates through the reward (rtdmd.reward_backprop_weight > 0"),
])
def test_bad_values_name_key_value_and_valid_range(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert message in str(err.value)


def test_bad_types_in_files(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nsteps = 1.5\n")
    with pytest.raises(ConfigError, match="trainer.steps = 1.5 has the wrong type"):
        parse_args(["--config", str(path)])
    path.write_text("[trainer\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_args(["--config", str(path)])
    # a quoted number in a file is a slip, not a string the command line had to give
    for line, expected in [('steps = "3"', "an integer, unquoted"), ('lr_generator = "1e-4"', "a number, unquoted"),
                           ('seed = true', "expected an integer")]:
        path.write_text(f"[trainer]\n{line}\n")
        with pytest.raises(ConfigError, match=expected):
            parse_args(["--config", str(path)])
    path.write_text('[dmd]\ngenerator_sigmas = "1,0.5"\n')
    with pytest.raises(ConfigError, match=r"dmd.generator_sigmas = '1,0.5' is a string in a file; expected a list"):
        parse_args(["--config", str(path)])
    path.write_text("[eval]\nat_end = \"false\"\n")
    with pytest.raises(ConfigError, match="true or false, unquoted"):
        parse_args(["--config", str(path)])


def test_a_per_rank_batch_on_the_command_line_is_not_dropped_for_a_global_one(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nglobal_batch_size = 32\n")
    with pytest.raises(ConfigError, match=r"--trainer.batch_size 8 would be ignored: .* = 32 \(from --config "):
        parse_args(["--config", str(path), "--trainer.batch_size", "8"])
    cfg = parse_args(["--config", str(path), "--trainer.batch_size", "8", "--trainer.global_batch_size", "0"])
    assert (cfg.trainer.batch_size, cfg.trainer.global_batch_size) == (8, 0)
    # side by side on the command line the global batch replaces the per-rank one, as its help says
    cfg = parse_args(["--trainer.batch_size", "8", "--trainer.global_batch_size", "64"])
    assert (cfg.trainer.batch_size, cfg.trainer.global_batch_size) == (8, 64)
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "digits-dmd2", "trainer": {"global_batch_size": 16}}))
    with pytest.raises(ConfigError, match=r"= 16 \(from the resumed run's config.json\)"):
        parse_args(["--resume", "--run_dir", str(tmp_path), "--trainer.batch_size", "4"])


def test_resume_starts_from_the_saved_config(tmp_path):
    saved = json.loads(json.dumps({"recipe": "digits-dmd2", "trainer": {"steps": 9, "batch_size": 4}}))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = parse_args(["--resume", "--run_dir", str(tmp_path), "--trainer.steps", "20"])
    assert cfg.trainer.batch_size == 4 and cfg.trainer.steps == 20


def test_a_runs_config_json_replays_its_settings_into_a_new_run(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    saved = to_dict(parse_args(["--run_dir", str(run), "--resume", "--trainer.steps", "7", "--method", "gdmd"]))
    (run / "config.json").write_text(json.dumps(saved))
    cfg = parse_args(["--config", str(run / "config.json")])
    assert cfg.trainer.steps == 7 and cfg.method == "gdmd"
    assert cfg.run_dir == "" and cfg.resume is False  # where and whether: the command line's to say
    with pytest.raises(ConfigError, match="--recipe digits-rtdmd differs from the recipe 'digits-dmd2' that --config"):
        parse_args(["--recipe", "digits-rtdmd", "--config", str(run / "config.json")])
    with pytest.raises(ConfigError, match="--method dmd2 differs from the resumed run's method 'gdmd'"):
        parse_args(["--resume", "--run_dir", str(run), "--method", "dmd2"])
    assert parse_args(["--resume", "--run_dir", str(run), "--method", "gdmd"]).method == "gdmd"
    with pytest.raises(ConfigError, match="--config needs a file"):
        parse_args(["--config"])


def test_help_lists_every_key(capsys):
    text = help_text()
    for key in ("--trainer.steps", "--dmd.guidance_scale", "--eval.num_samples", "--ops.backend", "--resume"):
        assert key in text
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    assert "--trainer.critic_updates" in capsys.readouterr().out


def test_help_shows_the_chosen_recipes_values_as_the_command_line_takes_them(capsys):
    assert "--trainer.critic_samples [fresh_last]" in help_text()  # digits-dmd2's, not the dataclass default
    assert "--dmd.generator_sigmas [1,0.75,0.5,0.25]" in help_text() and "--resume [false]" in help_text()
    with pytest.raises(SystemExit):
        parse_args(["--recipe=sd3-dmd2", "--help"])
    out = capsys.readouterr().out
    assert "recipe sd3-dmd2's value" in out and "--model.family [sd3]" in out
