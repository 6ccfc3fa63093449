from pathlib import Path

import pytest

from bertjob import cli
from bertjob.cli import main, resolve
from bertjob.config import (
    STAGES,
    ConfigError,
    InferConfig,
    PipelineConfig,
    PrepareConfig,
    PretrainConfig,
    TrainConfig,
    Workers,
    build,
    read_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_is_an_error_listing_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        build(PrepareConfig, {"output": "x", "max_lenght": 10})
    assert "max_lenght" in str(err.value) and "max_length" in str(err.value)


def test_all_problems_are_collected_in_one_error():
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, {"data": "d", "output": "o", "epochs": 0, "lr": -1, "mixed_precision": "fp8"})
    assert len(err.value.problems) == 3


def test_bad_types_values_and_every_stage_section_are_reported_at_once():
    """A range problem used to wait until the type problems were fixed, and a stage section's
    problems until the pipeline reached that stage (a train typo after prepare had run)."""
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, {"data": "d", "output": "o", "epochz": 1, "lr": "x", "num_workers": 0})
    assert [p.split(":")[0] for p in err.value.problems] == [
        "unknown setting 'epochz'; valid settings",
        "lr",
        "num_workers",
    ]
    sections = {"train": {"epochz": 1, "lr": -1}, "pretrain": {"epochs": 0}, "infer": {"batch_size": "x"}}
    with pytest.raises(ConfigError) as err:  # beside a bad shared setting too, not once it is fixed
        build(PipelineConfig, {"max_lenght": 64, "use_gpu": "maybe", **sections})
    assert [p.split(":")[:2] for p in err.value.problems] == [
        ["unknown setting 'max_lenght'; valid settings", " input, output_dir, model, max_length, truncation, "
         "num_workers, use_gpu, name, storage_path, infer_input, pretrain_stage, prepare, pretrain, train, evaluate, "
         "infer"], ["use_gpu", " expected true or false, got 'maybe'"],
        ["pretrain", " epochs"], ["train", " unknown setting 'epochz'; valid settings"], ["train", " lr"],
        ["infer", " batch_size"],
    ]  # fmt: skip


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig])
@pytest.mark.parametrize("name", ["", " ", "..", "a/b", "läuft-1", "a\tb"])
def test_a_run_name_that_is_not_one_directory_is_an_error(cls, name):
    """`--name ''` trained under a fresh timestamped name each time: a rerun never resumed. A name
    outside ASCII failed the run with a traceback from Ray Train's metrics ('ascii' codec can't ...)."""
    with pytest.raises(ConfigError, match="name: .* must be a plain directory name"):
        build(cls, {"data": "d", "output": "o", "name": name})


@pytest.mark.parametrize("cls", [TrainConfig, PretrainConfig])
def test_a_seed_that_numpy_or_torch_refuses_is_an_error(cls):
    """`--seed -1` failed every worker with numpy's 'expected non-negative integer' traceback, after
    Ray had started and the model had loaded (and again after each restart)."""
    import numpy as np
    import torch

    for seed in (-1, 2**64):
        with pytest.raises(ConfigError, match=f"seed: {seed} must be"):
            build(cls, {"data": "d", "output": "o", "seed": seed})
    top = build(cls, {"data": "d", "output": "o", "seed": 2**64 - 1}).seed  # what both take
    np.random.default_rng([top, 0])
    torch.manual_seed(top)


def test_a_setting_given_twice_in_a_config_file_is_an_error(tmp_path):
    """PyYAML kept the last `epochs:` and dropped the first without a word."""
    f = tmp_path / "c.yaml"
    f.write_text("data: d\noutput: o\nepochs: 3\ntrain:\n  lr: 1.0e-4\nepochs: 1\n")
    with pytest.raises(
        ConfigError, match=r"line 6 column 1: not valid YAML \(setting 'epochs' given twice\)"
    ):
        read_yaml(str(f))
    f.write_text("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")  # in a stage section too
    with pytest.raises(ConfigError, match="setting 'lr' given twice"):
        read_yaml(str(f))
    # Spelled both ways: the last one won without a word.
    f.write_text("max-length: 64\nmax_length: 128\n")
    with pytest.raises(
        ConfigError, match=r"setting 'max_length' given twice \(as 'max-length' and 'max_length'\)"
    ):
        read_yaml(str(f))
    f.write_text("train:\n  max-steps: 3\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match="setting 'max_steps' given twice"):
        read_yaml(str(f))


def test_a_yaml_merge_key_shares_settings_and_a_key_that_is_not_a_name_is_an_unknown_setting(tmp_path):
    """`<<: *base` (the same settings in two sections) was 'not valid YAML (could not determine a
    constructor for the tag merge)'; a key YAML reads as a number, null or boolean (`1:`, `~:`, `on:`)
    ended in a traceback (AttributeError: 'int' object has no attribute 'replace')."""
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: o\npretrain: &b {epochs: 1, batch-size: 8}\ntrain:\n  <<: *b\n  epochs: 2\n")
    assert read_yaml(str(f))["train"] == {"epochs": 2, "batch_size": 8}  # its own setting wins
    assert resolve("pipeline", {"config": str(f)}, {}).stage("train").batch_size == 8
    f.write_text("data: d\noutput: o\n1: x\n~: y\n")
    with pytest.raises(ConfigError) as err:
        resolve("train", {"config": str(f)}, {})
    assert [p.split(";")[0] for p in err.value.problems] == ["unknown setting 1", "unknown setting None"]
    with pytest.raises(ConfigError, match="train: unknown setting True; valid"):
        build(PipelineConfig, {"train": {True: 3}})


def test_a_text_setting_written_as_a_number_keeps_its_digits(tmp_path):
    """YAML 1.1 read `name: 0612` as octal 394 and `12:30` as 750: the run was named '394'. A text
    setting now takes the number as written; a numeric one takes YAML's value, as before."""
    f = tmp_path / "c.yaml"
    f.write_text("data: d\noutput: o\nname: 0612\nmax_steps: 0x10\nbatch_size: 1_6\nnum_workers: [1, 4]\n")
    cfg = resolve("train", {"config": str(f)}, {})
    assert (cfg.name, cfg.max_steps, cfg.batch_size, cfg.num_workers) == ("0612", 16, 16, Workers(1, 4))
    assert type(cfg.max_steps) is int and type(cfg.num_workers.max) is int
    f.write_text("output_dir: o\nname: 12:30\nprepare: {text_column: 1.10}\n")
    pipe = resolve("pipeline", {"config": str(f)}, {})
    assert (pipe.name, pipe.stage("prepare").text_column) == ("12:30", "1.10")


def test_dashed_keys_in_a_config_file_mean_what_the_flags_do(tmp_path):
    """`output-dir:` did not make a pipeline file (`bertjob train --config` called it an unknown setting)."""
    f = tmp_path / "c.yaml"
    f.write_text("output-dir: /runs/a\nmax-length: 64\n")
    assert resolve("train", {"config": str(f)}, {}).output == "/runs/a/train"
    f.write_text("output-dir: /runs/a\nmax-length: 64\ntrain:\n  max-steps: 3\n")
    assert resolve("train", {"config": str(f)}, {}).max_steps == 3
    assert resolve("prepare", {"config": str(f), "max_length": "96"}, {}).max_length == 96
    pipeline = resolve("pipeline", {"config": str(f)}, {"train": {"max_steps": "5"}})
    assert pipeline.stage("train").max_steps == 5


def test_a_config_file_that_is_not_text_is_one_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"epochs: 1\n\xd0\xff\x00binary")
    with pytest.raises(ConfigError, match="not a YAML text file"):
        read_yaml(str(f))


def test_a_config_file_that_is_not_yaml_is_one_line_saying_where(tmp_path, capsys):
    """PyYAML's error was printed whole: five lines, the last a caret under the quoted line."""
    f = tmp_path / "c.yaml"
    for text, where, what in (("input: [a.csv\n", "line 2 column 1", "expected ',' or ']', but got '<stream end>'"),
                              ("epochs: 1\n\tlr: 2\n", "line 2 column 1", "found character '\\t' that cannot start any token")):  # fmt: skip
        f.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--config", str(f)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and err[1:] == [
            f"  - config file {f}, {where}: not valid YAML ({what})"
        ], err


def test_a_stage_section_cannot_unlink_the_stages():
    """`train: {output: X}` trained into X while evaluate scored OUTPUT_DIR/train/model."""
    sections = {"prepare": {"output": "p"}, "train": {"output": "x", "epochs": 1}, "evaluate": {"model": "m"}}
    with pytest.raises(ConfigError) as err:
        build(PipelineConfig, sections)
    assert [p.split(":")[:2] for p in err.value.problems] == [["prepare", " output"], ["train", " output"],
                                                             ["evaluate", " model"]]  # fmt: skip
    with pytest.raises(ConfigError, match="train: model: the pipeline derives it"):
        build(PipelineConfig, {"pretrain_stage": True, "train": {"model": "m"}})
    assert (
        build(PipelineConfig, {"train": {"model": "m"}}).stage("train").model == "m"
    )  # no pretrain stage: a choice
    # A corpus to score named in the infer section is scored whole, as --infer-input's: it was
    # filtered to the unsup split, the prepared data's default (half of an IMDb tree's reviews).
    assert build(PipelineConfig, {"infer": {"input": "x"}}).stage("infer").split == ""
    assert build(PipelineConfig, {"infer_input": "x"}).stage("infer").split == ""
    assert build(PipelineConfig, {"infer": {"input": "x", "split": "test"}}).stage("infer").split == "test"
    assert build(PipelineConfig, {}).stage("infer").split == "unsup"
    # And one named in the evaluate section is read whole: a CSV was refused as having no split
    # of its own (test, the prepared data's); an IMDb tree is asked for --split
    assert build(PipelineConfig, {"evaluate": {"input": "x"}}).stage("evaluate").split == ""
    assert (
        build(PipelineConfig, {"evaluate": {"input": "x", "split": "test"}}).stage("evaluate").split == "test"
    )
    assert build(PipelineConfig, {}).stage("evaluate").split == "test"


def test_bad_types_are_named():
    with pytest.raises(ConfigError, match="max_length: expected an integer"):
        build(PrepareConfig, {"output": "x", "max_length": "long"})
    assert build(TrainConfig, {"data": "d", "output": "o", "use_gpu": "false"}).use_gpu is False
    assert (
        build(TrainConfig, {"data": "d", "output": "o", "use_gpu": 1}).use_gpu is True
    )  # YAML's 1, as --use-gpu 1
    with pytest.raises(ConfigError, match="use_gpu: expected true or false, got 2"):
        build(TrainConfig, {"data": "d", "output": "o", "use_gpu": 2})


def test_head_tokens_default_to_a_quarter_of_max_length():
    assert build(PrepareConfig, {"output": "x"}).head_n == 128
    assert build(PrepareConfig, {"output": "x", "max_length": 128}).head_n == 32
    assert build(PrepareConfig, {"output": "x", "max_length": 128, "head_tokens": 50}).head_n == 50
    with pytest.raises(ConfigError, match="head_tokens"):
        build(PrepareConfig, {"output": "x", "max_length": 128, "head_tokens": 126})
    # The quickstart's head_tokens 64 under a shorter --max-length: the error gave no number to compare.
    with pytest.raises(ConfigError) as err:
        resolve("pipeline", {"config": str(ROOT / "configs" / "quickstart.yaml"), "max_length": 64}, {})
    assert err.value.problems == [
        "prepare: head_tokens: 64 must be between 0 (auto) and max_length - 3 (61 at max_length 64)"
    ]


def test_flags_override_yaml(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("output: out\nmax_length: 128\ntruncation: head\n")
    cfg = resolve("prepare", {"config": str(cfg_file), "max_length": "256"}, {})
    assert (cfg.max_length, cfg.truncation, cfg.output) == (256, "head", "out")


def test_a_shared_flag_wins_over_a_stage_section_of_the_file(tmp_path):
    """`bertjob pipeline --config configs/quickstart.yaml --num-workers 2` trained with the file's
    `train: {num_workers: 1}`; `--infer-input X` scored the file's `infer: {input: Y}`."""
    f = tmp_path / "pipe.yaml"
    f.write_text("output_dir: o\ntrain:\n  num_workers: 1\n  epochs: 5\ninfer:\n  input: /y\n")
    pipe = resolve("pipeline", {"config": str(f), "num_workers": "2", "infer_input": "/x"}, {})
    assert (pipe.stage("train").num_workers, pipe.stage("train").epochs) == (Workers(2, 2), 5)
    assert pipe.stage("infer").input == "/x"
    assert resolve("pipeline", {"config": str(f)}, {}).stage("train").num_workers == Workers(1, 1)
    # a stage's own flag is more specific still
    pipe = resolve("pipeline", {"config": str(f), "num_workers": "2"}, {"train": {"num_workers": "3"}})
    assert pipe.stage("train").num_workers == Workers(3, 3)
    assert resolve("infer", {"config": str(f), "infer_input": "/x"}, {}).input == "/x"


def test_stage_takes_its_settings_from_a_pipeline_file(tmp_path):
    f = tmp_path / "pipe.yaml"
    f.write_text("output_dir: /runs/a\nmax_length: 128\ntrain:\n  epochs: 5\n")
    train = resolve("train", {"config": str(f), "lr": "3e-5"}, {})
    assert (train.data, train.output, train.epochs, train.lr) == (
        "/runs/a/prepared",
        "/runs/a/train",
        5,
        3e-5,
    )
    infer = resolve("infer", {"config": str(f), "output_dir": "/runs/b"}, {})
    assert (infer.model, infer.split) == ("/runs/b/train/model", "unsup")
    # A corpus of its own is scored whole, as --infer-input's: it was filtered to the unsup split.
    infer = resolve("infer", {"config": str(f), "input": "/corpus"}, {})
    assert (infer.input, infer.split) == ("/corpus", "")


def test_the_pretrain_stage_is_off_unless_asked_for_and_then_train_starts_from_its_model(tmp_path):
    f = tmp_path / "pipe.yaml"
    f.write_text("output_dir: /runs/a\nname: r\npretrain:\n  epochs: 3\n")
    assert resolve("train", {"config": str(f)}, {}).model == "minilm"  # a section alone does not enable it
    pretrain = resolve("pretrain", {"config": str(f)}, {})
    assert (pretrain.data, pretrain.output, pretrain.epochs, pretrain.name) == (
        "/runs/a/prepared",
        "/runs/a/pretrain",
        3,
        "r-pretrain",
    )
    assert (
        resolve("train", {"config": str(f), "pretrain_stage": "true"}, {}).model == "/runs/a/pretrain/model"
    )
    assert build(PipelineConfig, read_yaml(str(ROOT / "configs" / "imdb-itpt-1gpu.yaml"))).pretrain_stage
    assert not build(PipelineConfig, read_yaml(str(ROOT / "configs" / "quickstart.yaml"))).pretrain_stage
    with pytest.raises(ConfigError, match="splits"):
        build(PretrainConfig, {"data": "d", "output": "o", "splits": "train,test"})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_for_every_stage(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("bertjob" in first or "jobs/" in first), (
        "first line gives the launch command"
    )
    pipeline = build(PipelineConfig, read_yaml(str(path)))
    for stage in STAGES:
        assert isinstance(pipeline.stage(stage), (PrepareConfig, PretrainConfig, TrainConfig, InferConfig))


def test_cli_reports_config_errors_before_starting(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--output", "x", "--truncation", "middle"])
    assert exit_.value.code == 2
    assert "truncation" in capsys.readouterr().err
    # `--text-column "$COL"` with COL unset: no text read, every row quarantined, and infer exited 0
    for command in ("prepare", "infer", "evaluate"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--input", "in.csv", "--model", "m", "--output", "x", "--text-column", ""])
        assert exit_.value.code == 2
        assert "text_column: must name the column of the review's text" in capsys.readouterr().err


def test_a_second_config_file_is_an_error(capsys, tmp_path):
    """`--config base.yaml --config run.yaml` read run.yaml alone: base.yaml's settings were dropped."""
    (tmp_path / "a.yaml").write_text("epochs: 0\n")
    (tmp_path / "b.yaml").write_text("lr: 1.0e-4\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")])
    assert exit_.value.code == 2
    assert "error: --config given twice (" in capsys.readouterr().err


def test_a_log_level_that_is_not_one_is_an_error_and_any_command_takes_one(capsys):
    """`--log-level verbose` logged at INFO without a word."""
    with pytest.raises(SystemExit) as exit_:
        main(["--log-level", "verbose", "prepare", "--output", "x", "--truncation", "middle"])
    assert exit_.value.code == 2
    assert "--log-level: 'verbose' is not one of DEBUG, INFO" in capsys.readouterr().err
    assert cli.make_parser().parse_args(["--log-level", "debug", "prepare"]).log_level == 10
    # After the command too, where a jobs/ entrypoint (which puts the command first) can give it:
    # it was an unrecognized argument.
    assert cli.make_parser().parse_args(["train", "--log-level", "error"]).log_level == 40
    assert cli.make_parser().parse_args(["--log-level", "debug", "infer"]).log_level == 10


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("pretrain", PretrainConfig)])
def test_help_documents_every_setting(capsys, command, cls):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in out


def test_help_offers_only_the_pipeline_flags_the_stage_reads(capsys):
    """`train --help` listed --input, --max-length, --truncation and --infer-input, each always an error there."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--output-dir" in out and "--pretrain-stage" in out
    assert not {"--input", "--max-length", "--truncation", "--infer-input"} & set(out.split())
    with pytest.raises(SystemExit) as exit_:  # still parsed, to say where it belongs
        main(["train", "--data", "d", "--output", "o", "--max-length", "256"])
    assert exit_.value.code == 2 and "belongs to `bertjob prepare`" in capsys.readouterr().err


def test_a_stage_setting_given_to_the_pipeline_without_its_stage_names_the_flag_to_use(capsys):
    """`bertjob pipeline --input r.csv --test-fraction 0.2 --epochs 1` said only "unrecognized arguments"."""
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "pipeline",
                "--input",
                "r.csv",
                "--test-fraction",
                "0.2",
                "--epochs=1",
                "--text-column",
                "review",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert (
        "--test-fraction: a stage setting, not the pipeline's; give it with its stage: --prepare.test-fraction\n"
        in err
    )
    assert (
        "--epochs: a stage setting, not the pipeline's; give it with its stage: --pretrain.epochs or --train.epochs"
        in err
    )
    assert "--text-column: a stage setting" in err and "--evaluate.text-column or --infer.text-column" in err
    with pytest.raises(SystemExit) as exit_:  # a flag of no stage, and another command's, as before
        main(["pipeline", "--input", "r.csv", "--bogus", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "d", "--output", "o", "--bogus", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_a_mistyped_flag_is_answered_with_the_nearest_and_underscores_are_read(capsys):
    """`--max-lenght 32`, `bertjob prepare reviews.csv` and `--max_length 32` (the key as a config
    file spells it) were each 'unrecognized arguments' beside the usage of `bertjob` itself."""

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        assert exit_.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    assert error("prepare", "--input", "r.csv", "--output", "o", "--max-lenght", "32").endswith(
        "--max-lenght 32; did you mean --max-length? (`bertjob prepare --help` lists every setting)"
    )
    assert error("prepare", "r.csv").endswith(
        "r.csv; bertjob takes no positional arguments: give each value after its flag (--input r.csv ...)"
    )
    assert error("train", "--bogus", "1").endswith("--bogus 1 (`bertjob train --help` lists every setting)")
    # a flag's prefix is no flag: `--resume true` trained as --resume-changed true, a run of other settings
    assert error("train", "--data", "d", "--resume", "true").endswith(
        "--resume true; did you mean --resume-changed? (`bertjob train --help` lists every setting)"
    )
    assert error("train", "--data", "d", "--log-lev", "DEBUG").endswith("--log-lev DEBUG; did you mean --log-level? "
                                                                     "(`bertjob train --help` lists every setting)")  # fmt: skip
    # read as --max-length and --validation-fraction: their values are what is wrong
    with pytest.raises(SystemExit):
        main(["prepare", "--max_length", "abc", "--validation_fraction=2"])
    err = capsys.readouterr().err
    assert (
        "  - max_length: expected an integer, got 'abc'\n  - validation_fraction: 2.0 must be less than 1"
        in err
    )


CONFIGS = (PrepareConfig, PretrainConfig, TrainConfig, InferConfig, PipelineConfig)
REQUIRED = {"data": "d", "output": "o", "input": "i", "model": "m"}  # the settings with no usable default


def _bad_value(f, typ):
    """A value outside the field's declared range, or None when every value is valid."""
    meta = f.metadata
    if meta.get("choices"):
        return "not-a-choice"
    if typ is Workers:
        return meta["ge"] - 1
    if typ not in (int, float):
        return None
    assert meta.get("unbounded") or {"ge", "gt", "le", "lt"} & set(meta), (
        f"{f.name}: a numeric setting without bounds (give opt(..., ge=/gt=/le=/lt=) or unbounded=True)"
    )
    if meta.get("unbounded"):
        return None
    if "gt" in meta:
        return meta["gt"]
    if "ge" in meta:
        return meta["ge"] - 1
    return meta["lt"] if "lt" in meta else meta["le"] + 1


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_setting_outside_its_range_is_one_clear_error_naming_it(cls):
    import dataclasses
    import typing

    types = typing.get_type_hints(cls)
    required = {k: v for k, v in REQUIRED.items() if k in types}
    build(cls, required)  # the defaults are valid
    tried = 0
    for f in dataclasses.fields(cls):
        bad = _bad_value(f, types[f.name])
        if bad is None:
            continue
        with pytest.raises(ConfigError) as err:
            build(cls, {**required, f.name: bad})
        assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"{f.name}:"), err.value
        tried += 1
    assert tried >= 3
    # Infinity is within every lower bound: `--placement-timeout-s inf` gave up at once, "within infs".
    for f in dataclasses.fields(cls):
        if types[f.name] is float:
            with pytest.raises(
                ConfigError, match=rf"^invalid configuration:\n  - {f.name}: inf must be a finite"
            ):
                build(cls, {**required, f.name: "inf"})
    # the bugs that named this test: a ZeroDivisionError in the worker, an untrained export, 0 CPUs
    fields = {f.name: f for f in dataclasses.fields(cls)}
    cpus = 0 if "gt" in getattr(fields.get("cpus_per_worker"), "metadata", {}) else -1  # train: 0 is auto
    for key, value in {"log_every_steps": 0, "max_steps": -3, "cpus_per_worker": cpus}.items():
        if key in types:
            with pytest.raises(ConfigError, match=key):
                build(cls, {**required, key: value})


def test_a_pipeline_only_flag_on_a_stage_command_names_where_it_belongs(tmp_path):
    with pytest.raises(ConfigError, match=r"max_length.*bertjob prepare"):
        resolve("train", {"max_length": "256"}, {})
    with pytest.raises(ConfigError, match=r"infer_input.*bertjob pipeline"):
        resolve("train", {"infer_input": "x"}, {})
    with pytest.raises(ConfigError, match=r"output_dir.*pipeline file"):
        resolve("train", {"output_dir": "run"}, {})
    f = tmp_path / "pipe.yaml"
    f.write_text("output_dir: /runs/a\nmax_length: 128\n")
    # with a pipeline file, the shared settings that reach the stage still work ...
    assert resolve("train", {"config": str(f), "output_dir": "/runs/b"}, {}).output == "/runs/b/train"
    assert resolve("prepare", {"config": str(f), "max_length": "256"}, {}).max_length == 256
    # ... and one the stage never reads is an error, not a silent no-op
    with pytest.raises(ConfigError, match=r"max_length.*bertjob prepare"):
        resolve("train", {"config": str(f), "max_length": "256"}, {})


def test_stage_shared_lists_exactly_the_pipeline_settings_each_stage_reads():
    import dataclasses

    from bertjob.config import STAGE_SHARED

    changed = {"input": "other", "output_dir": "elsewhere", "model": "m2", "max_length": 64, "truncation": "head",
               "num_workers": 3, "use_gpu": True, "name": "n2", "storage_path": "s2", "infer_input": "x",
               "pretrain_stage": True}  # fmt: skip
    base = build(PipelineConfig, {})
    for stage in STAGES:
        reads = {
            k for k, v in changed.items() if build(PipelineConfig, {k: v}).stage(stage) != base.stage(stage)
        }
        assert reads == set(STAGE_SHARED[stage]), stage
    assert set(changed) == {f.name for f in dataclasses.fields(PipelineConfig)} - set(STAGES)


@pytest.mark.parametrize(
    "value, expected",
    [
        (3, Workers(3, 3)),
        ("3", Workers(3, 3)),
        ("1-4", Workers(1, 4)),
        ([1, 4], Workers(1, 4)),
        ([2, 2], Workers(2, 2)),
    ],
)
def test_num_workers_is_a_count_or_an_elastic_range(value, expected):
    cfg = build(TrainConfig, {"data": "d", "output": "o", "num_workers": value})
    assert cfg.num_workers == expected
    assert cfg.num_workers.scaling() == (expected.min if expected.min == expected.max else tuple(expected))


@pytest.mark.parametrize("value", ["4-1", "0-2", [1, 2, 3], "one", True, [1.5, 2], "2-", "-"])
def test_a_bad_worker_range_is_one_error_naming_num_workers(value):
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, {"data": "d", "output": "o", "num_workers": value})
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("num_workers:"), err.value


def test_the_flag_takes_a_range_and_yaml_a_list(tmp_path):
    from bertjob.cli import make_parser, resolve

    (tmp_path / "p.yaml").write_text("output_dir: out\nnum_workers: [1, 3]\n")
    assert resolve("train", {"config": str(tmp_path / "p.yaml")}, {}).num_workers == Workers(1, 3)
    ns = make_parser().parse_args(["train", "--data", "d", "--output", "o", "--num-workers", "2-5"])
    args = {k: v for k, v in vars(ns).items() if k not in ("command", "log_level")}
    assert resolve("train", args, {}).num_workers == Workers(2, 5)


def test_a_config_files_relative_input_found_only_beside_the_file_says_so(tmp_path, monkeypatch):
    """`bertjob pipeline --config project/run.yaml` from another directory: `input: reviews.csv` was
    'no such file or directory', with no word that paths are read from the current directory."""
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "reviews.csv").write_text("text,label\ngreat,pos\n")
    (tmp_path / "project" / "run.yaml").write_text(
        "input: reviews.csv\noutput_dir: out\ntrain:\n  epochs: 1\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"input: reviews.csv is relative to the current directory \(.*\), where it "
                                          r"does not exist; beside the config file it does \(project/reviews.csv\)"):  # fmt: skip
        resolve("pipeline", {"config": "project/run.yaml"}, {})
    monkeypatch.chdir(tmp_path / "project")  # run there, it is read as before
    assert resolve("pipeline", {"config": "run.yaml"}, {}).input == "reviews.csv"
    monkeypatch.setenv("HOME", str(tmp_path / "project"))  # `~` as in every other path: it was "No such file"
    assert resolve("pipeline", {"config": "~/run.yaml"}, {}).input == "reviews.csv"


def test_version_names_bertjob_and_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    from importlib.metadata import version

    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"bertjob {version('bertjob')} (ray {version('ray')}, torch {version('torch')}, "
        f"transformers {version('transformers')})"
    )


def test_an_interrupt_says_what_the_same_command_again_does(capsys, monkeypatch, tmp_path):
    """An interrupted prepare said that the same command resumes; it prepares everything again. So
    did infer and evaluate with --overwrite, whose rerun replaced the rows the stopped run committed."""

    def interrupted(command, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    for argv, said in (
        (["--log-level", "WARNING", "prepare", "--output", str(tmp_path)], "prepare does not resume: the same command again prepares from the start"),
        # no file committed yet: it said the same command resumes where this one stopped (test_infer.py: with some)
        (["infer", "--input", "x", "--model", "m", "--output", str(tmp_path)],
         "no rows were committed yet (a file of them is, every 2,000 rows: --rows-per-shard): the same command again "
         "starts from the beginning"),
        # --overwrite replaces what the stopped run committed: the same command scored from the start
        (["evaluate", "--input", "x", "--model", "m", "--output", str(tmp_path), "--overwrite"],
         "the same command without --overwrite resumes where this one stopped (with it, it starts again)"),
        (["pipeline", "--output-dir", str(tmp_path), "--infer.overwrite", "true"],
         "the same command without --infer.overwrite true resumes where this one stopped (with it, it starts again)"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 130
        assert capsys.readouterr().err == f"bertjob: interrupted; {said}\n"
    (tmp_path / "o" / "predictions").mkdir(parents=True)
    (tmp_path / "o" / "predictions" / "part-0.parquet").write_bytes(b"PAR1")  # not one a run committed
    with pytest.raises(SystemExit):  # no rows to count: the rerun's own error names the file
        main(["infer", "--input", "x", "--model", "m", "--output", str(tmp_path / "o")])
    assert capsys.readouterr().err == "bertjob: interrupted; the same command again resumes where this one stopped\n"


def test_a_stage_setting_at_the_top_of_a_pipeline_file_says_which_section_it_goes_in():
    """`epochs: 3` beside output_dir was only an unknown setting among the pipeline's."""
    with pytest.raises(ConfigError) as err:
        build(PipelineConfig, {"output_dir": "o", "epochs": 3, "data": "x", "foo": 1})
    assert err.value.problems[0].startswith(
        "unknown setting 'epochs' at the top level of a pipeline file; it is a setting of the pretrain, train "
        "stages: put it in a stage's section (train: {epochs: ...}); valid settings: input, output_dir"
    )
    assert err.value.problems[1].startswith("unknown setting 'data'; valid")  # derived: in no section
    assert err.value.problems[2].startswith("unknown setting 'foo'; valid")
