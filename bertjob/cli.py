"""`bertjob prepare | pretrain | train | infer | evaluate | pipeline` — flags generated from the config dataclasses.

Settings come from `--config FILE` (YAML) and then from flags; flags win. A stage given a pipeline
YAML (one with `output_dir` or stage sections) takes that stage's derived settings from it, so the
same file drives `bertjob pipeline` and each stage's RayJob.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import logging
import os
import signal
import sys
import typing
from collections.abc import Iterator
from typing import Any

from bertjob.config import (
    STAGE_CLASSES,
    STAGE_LINKS,
    STAGE_SHARED,
    STAGES,
    ConfigError,
    JobError,
    PipelineConfig,
    SetupError,
    base_type,
    build,
    is_pipeline_file,
    read_yaml,
)

log = logging.getLogger("bertjob")

COMMANDS: dict[str, type] = {**STAGE_CLASSES, "pipeline": PipelineConfig}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    hidden: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """A flag per field of `cls` but those in `skip`; those in `hidden` are parsed, not shown."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or types[f.name] is dict:
            continue
        typ, _ = base_type(types[f.name])
        meta = {"bool": "true|false", "int": "N", "float": "X", "str": "S", "Workers": "N|MIN-MAX"}[
            typ.__name__
        ]
        default = {"": "''", None: "the model's"}.get(f.default, f.default)
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            metavar=meta,
            nargs="?" if typ is bool else None,
            const="true" if typ is bool else None,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS
            if f.name in hidden
            else f"{f.metadata.get('help', '')} (default: {default})",
        )


def _versions() -> str:
    """bertjob's version and those of what it runs on, for a bug report (without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"bertjob {of('bertjob')} (ray {of('ray')}, torch {of('torch')}, transformers {of('transformers')})"
    )


class _Once(argparse.Action):
    """A second --config is an error: the first file's settings were dropped without a word."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option} given twice ({getattr(namespace, self.dest)}, {value}): one file per command; "
                         f"flags override its settings")  # fmt: skip
        setattr(namespace, self.dest, value)


def _log_level(name: str) -> int:
    """A logging level by name, any case: `--log-level verbose` (or `10`) logged at INFO without a word."""
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"{name!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def make_parser() -> argparse.ArgumentParser:
    # No prefixes of flags: `--resume true` was read as --resume-changed true, `--epoch 2` as --epochs.
    parser = argparse.ArgumentParser(
        prog="bertjob",
        allow_abbrev=False,
        description="Fine-tune BERT for sentiment and score review corpora on Ray.",
        epilog="Each subcommand takes --config FILE (YAML) and --key value flags; flags win.",
    )
    parser.add_argument(
        "--log-level", default="INFO", type=_log_level, metavar="LEVEL",
        help="logging level: DEBUG, INFO, WARNING or ERROR (default: INFO)",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").splitlines()[0], description=cls.__doc__, allow_abbrev=False)
        p.add_argument(
            "--config", metavar="FILE", action=_Once, help="YAML file of settings (flags override it)"
        )
        # Here too: a jobs/ entrypoint (`python jobs/train.py ...`) puts its command first, so a
        # --log-level before it could not be given, and after it was an unrecognized argument.
        p.add_argument("--log-level", default=argparse.SUPPRESS, type=_log_level, metavar="LEVEL",
                       help="logging level, as before the command (default: INFO)")  # fmt: skip
        _add_fields(p, cls)
        if name == "pipeline":
            p.epilog = "Stage settings: --prepare.KEY, --pretrain.KEY, --train.KEY, --evaluate.KEY, --infer.KEY (see each stage's --help)."
        else:
            extra = p.add_argument_group(
                "with a pipeline config (--config with output_dir or stage sections)"
            )
            stage_fields = {f.name for f in dataclasses.fields(cls)}
            # The pipeline settings this stage does not read are parsed only to be refused by
            # name (resolve); --help does not offer them.
            unread = {f.name for f in dataclasses.fields(PipelineConfig)} - set(STAGE_SHARED[name])
            _add_fields(extra, PipelineConfig, skip=stage_fields, hidden=unread)
    return parser


def resolve(command: str, args: dict[str, Any], dotted: dict[str, dict[str, Any]]) -> Any:
    """Build the command's config from --config and flags, raising one ConfigError for all problems."""
    cls = COMMANDS[command]
    path = args.pop("config", None)
    path = path and os.path.expanduser(path)  # as every other path (`--config "~/run.yaml"`, quoted)
    data = read_yaml(path) if path else {}
    _check_relative_inputs(path, data)
    _flags_win_over_sections(data, args)
    if command == "pipeline":
        for stage, values in dotted.items():
            data[stage] = {**(data.get(stage) or {}), **values}
        return build(PipelineConfig, {**data, **args})
    if dotted:
        raise ConfigError([f"--{s}.KEY flags belong to `bertjob pipeline`" for s in dotted])
    stage_fields = {f.name for f in dataclasses.fields(cls)}
    pipe_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    with_file = is_pipeline_file(data)
    # A pipeline-only flag the stage would not read is an error, never a silent no-op.
    misplaced = [
        k for k in args if k in pipe_fields - stage_fields and not (with_file and k in STAGE_SHARED[command])
    ]
    if misplaced:
        raise ConfigError([_belongs(k, command) for k in misplaced])
    if with_file:
        pipe_args = {k: v for k, v in args.items() if k in pipe_fields}
        pipeline = build(PipelineConfig, {**data, **pipe_args})
        cfg = pipeline.stage(command, {k: v for k, v in args.items() if k in stage_fields})
        if command in ("train", "pretrain"):  # the pipeline's run, which a rerun of either resumes
            from bertjob import pipeline as pipeline_job

            cfg = pipeline_job.stage_run(cfg, command)
        return cfg
    return build(cls, {**data, **args})


def _flags_win_over_sections(data: dict[str, Any], args: dict[str, Any]) -> None:
    """A shared flag wins over the file also where a stage section of the file sets the same setting:
    `bertjob pipeline --config configs/quickstart.yaml --num-workers 2` trained with its
    `train: {num_workers: 1}`, and `--infer-input X` scored an `infer: {input: Y}`, without a word."""
    for stage in STAGES:
        section = data.get(stage)
        if isinstance(section, dict):
            given = {"input" if k == "infer_input" else k for k in args if k in STAGE_SHARED[stage]}
            data[stage] = {k: v for k, v in section.items() if k not in given}


INPUT_KEYS = ("input", "data", "model", "infer_input")  # paths a config file names to be read


def _check_relative_inputs(path: str | None, data: dict[str, Any]) -> None:
    """A relative path in a config file means the current directory, not the file's: one that is
    missing here but present beside the file (`bertjob pipeline --config project/run.yaml` from
    another directory) was 'no such file or directory' without a word of why."""
    if not path or os.path.dirname(os.path.abspath(path)) == os.getcwd():
        return
    base = os.path.dirname(path)
    sections = [("", data)] + [(f"{k}: ", v) for k, v in data.items() if isinstance(v, dict)]
    problems = [
        f"{where}{key}: {value} is relative to the current directory ({os.getcwd()}), where it does not exist; "
        f"beside the config file it does ({os.path.join(base, value)}): paths in a config file are read from "
        f"the directory bertjob runs in, so run it there or give the path from here"
        for where, section in sections
        for key, value in section.items()
        if key in INPUT_KEYS and isinstance(value, str) and value and "://" not in value
        and not os.path.isabs(value) and not os.path.exists(value) and os.path.exists(os.path.join(base, value))
    ]  # fmt: skip
    if problems:
        raise ConfigError(problems)


def _belongs(key: str, command: str) -> str:
    owners = [
        f"`bertjob {c}`" for c, cls in COMMANDS.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    where = ", ".join(owners[:-1]) + f" or {owners[-1]}" if len(owners) > 1 else owners[0]
    hint = " (or here, with a pipeline file: --config FILE)" if key in STAGE_SHARED[command] else ""
    return f"{key}: not a `bertjob {command}` setting; it belongs to {where}{hint}"


def _undotted(unknown: list[str]) -> list[str]:
    """Stage settings given to the pipeline without their stage (`--epochs 1`, `--test-fraction 0.2`):
    argparse said only "unrecognized arguments", not that they go as --train.epochs."""
    problems = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        key = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        stages = [s for s in STAGES if key and key in {f.name for f in dataclasses.fields(STAGE_CLASSES[s])}
                  and key not in STAGE_LINKS[s]]  # fmt: skip
        if stages:
            dotted = [f"--{s}.{flag[2:]}" for s in stages]
            either = ", ".join(dotted[:-1]) + f" or {dotted[-1]}" if len(dotted) > 1 else dotted[0]
            problems.append(f"{flag}: a stage setting, not the pipeline's; give it with its stage: {either}")
    return problems


def _split_dotted(argv: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Take --stage.key value pairs (pipeline stage settings) out of argv."""
    rest, dotted = [], {}
    it = iter(argv)
    for arg in it:
        head = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in head and not head.startswith("."):
            stage, key = head.split(".", 1)
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None:
                raise ConfigError([f"{arg}: needs a value"])
            dotted.setdefault(stage, {})[key.replace("-", "_")] = value
        elif "_" in head:  # --max_length, as the key is spelled in a config file: unrecognized
            rest.append("--" + head.replace("_", "-") + arg[2 + len(head) :])
        else:
            rest.append(arg)
    return rest, dotted


def _nearest(command: str, unknown: list[str]) -> str:
    """A hint for flags argparse did not recognise: the nearest flag of the command (`--max-lenght`,
    `--epoch`), and where every flag is listed; a value without a flag (`bertjob prepare FILE`), the flag."""
    known = [_flag(f.name) for f in dataclasses.fields(COMMANDS[command])] + ["--config", "--log-level"]
    for before, arg in zip(["", *unknown], unknown):
        if not arg.startswith("-") and not (
            before.startswith("-") and "=" not in before
        ):  # not a flag's value
            return (
                f"; bertjob takes no positional arguments: give each value after its flag (--input {arg} ...)"
            )
        if near := difflib.get_close_matches(arg.split("=", 1)[0], known, n=1):
            return f"; did you mean {near[0]}? (`bertjob {command} --help` lists every setting)"
    return f" (`bertjob {command} --help` lists every setting)"


def _rerun(command: str, cfg: Any = None) -> str:
    """What the same command does after this one stopped short. prepare keeps nothing of a stopped
    run (its shards are only whole with the manifest): it said that the same command resumes, and
    then prepared everything again. Nor does infer or evaluate with --overwrite (the pipeline with
    --infer.overwrite true), which replaces what the stopped run committed: it said so too, and the
    same command scored from the start."""
    if command == "prepare":
        return "prepare does not resume: the same command again prepares from the start"
    from bertjob.infer import overwrite_flag

    if command == "pipeline" and cfg is not None:  # its scoring stages' own --STAGE.overwrite
        redo = [overwrite_flag(s, True) for s in ("evaluate", "infer") if cfg.stage(s).overwrite]
    else:
        redo = [overwrite_flag(command, False)] if getattr(cfg, "overwrite", False) else []
    if redo:
        return (
            f"the same command without {' and '.join(redo)} resumes where this one stopped (with it, it starts "
            f"again)"
        )
    return "the same command again resumes where this one stopped"


def _kept(command: str, cfg: Any) -> str:
    """What a stopped infer or evaluate keeps: the rows of its committed files. It said that the same
    command resumes where it stopped, and with no file full yet that was from the start."""
    if command not in ("infer", "evaluate") or cfg is None or cfg.overwrite:
        return ""
    from bertjob.infer import committed_rows, rows_per_file

    try:
        rows = committed_rows(cfg.output)
    except (OSError, ValueError):  # its store is away, or a file there is no Parquet: the rerun says which
        return ""
    if rows:
        return f"{rows:,} rows are committed: the same command again resumes from them"
    return (f"no rows were committed yet (a file of them is, every {rows_per_file(cfg):,} rows: --rows-per-shard): "
            f"the same command again starts from the beginning")  # fmt: skip


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kubectl delete pod`, `ray job stop`, `timeout`): raised in the main thread as
    Ctrl-C raises KeyboardInterrupt, so that the run ends the same way, resumable."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """SIGTERM raises Terminated while the command runs (`cluster.init_ray` keeps it so). The list
    yielded records it: inside `ray.get` (a train run waiting on Ray Train) Ray replaces whatever
    a signal handler raised with a plain KeyboardInterrupt, and the job exited 130, not 143."""
    received: list[int] = []

    def terminated(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    command, cfg = "", None
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a caller's: kept
    with _sigterm_interrupts() as terminated:
        try:
            rest, dotted = _split_dotted(argv)
            ns, unknown = parser.parse_known_args(rest)
            if unknown and ns.command == "pipeline" and (problems := _undotted(unknown)):
                raise ConfigError(problems)
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}{_nearest(ns.command, unknown)}")
            command = ns.command
            logging.basicConfig(
                level=ns.log_level,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            args = {k: v for k, v in vars(ns).items() if k not in ("command", "log_level")}
            cfg = resolve(ns.command, args, dotted)
            rc, said = run_command(ns.command, cfg), ""
        except ConfigError as err:
            rc, said = 2, f"bertjob: {err}\n"
        except SetupError as err:  # input, model, output or cluster problems; a reader's bad line
            rc, said = 2, f"bertjob: error: {_own_words(err)}\n"
        except JobError as err:
            rc, said = 1, f"bertjob: error: {_own_words(err)}\n"
        except OSError as err:  # a disk that filled, an object store gone mid-run: once it is back
            rc, said = (
                1,
                f"bertjob: error: {_own_words(err)}{_full_disk(err, cfg)}\nbertjob: {_rerun(command, cfg)}\n",
            )
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: 128 + the signal, as a shell reports it
            rc = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
            said = f"bertjob: interrupted; {getattr(stop, 'kept', '') or _kept(command, cfg) or _rerun(command, cfg)}\n"
        # Leave Ray before the last word, whatever ended the command: its exit hook does the same
        # after a 0.5 s sleep, and after a stopped Ray Data run (a SIGTERMed prepare, on a loaded
        # machine) it turned the exit status into 1.
        if "ray" in sys.modules and not ray_before:
            from bertjob.cluster import leave_ray

            try:
                leave_ray()
            except KeyboardInterrupt:  # Ctrl-C twice: a traceback from inside Ray's shutdown was the last word
                pass  # Ray's exit hook stops what is left
    if said:
        parser.exit(rc, said)
    return rc


def _own_words(err: Exception) -> str:
    """The error's own message. One raised in a Ray task (a reader meeting a bad line) reaches the
    driver as Ray's RayTaskError, an instance of its cause's class too, whose text is the remote
    traceback; Ray Data also appends its retry advice to the cause's message, or, to an OSError with
    an errno (a disk that filled: ENOSPC), as its file name, which printed after the message."""
    cause = getattr(err, "cause", None)
    if not isinstance(cause, Exception):
        return str(err)
    if isinstance(cause, OSError) and cause.errno and str(cause.filename).startswith("Failed to "):
        return f"[Errno {cause.errno}] {cause.strerror}"
    return str(cause).split("\nFailed to ")[0]


def _full_disk(err: OSError, cfg: Any) -> str:
    """Where a disk that filled (ENOSPC) is: the error named no path ("[Errno 28] Error writing bytes
    to file"), and a job writes under its output and, training, its checkpoints' storage_path."""
    cause = getattr(err, "cause", None)
    if errno.ENOSPC not in (err.errno, getattr(cause, "errno", None)):
        return ""
    places = [
        f"{key} {getattr(cfg, key)}"
        for key in ("output", "output_dir", "storage_path")
        if getattr(cfg, key, "")
    ]
    return (
        f"; free space where the job writes ({', '.join(places)}), or give it another directory"
        if places
        else ""
    )


def run_command(command: str, cfg: Any) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if command == "prepare":
        from bertjob import prepare

        prepare.run(cfg)
    elif command == "pretrain":
        from bertjob import pretrain

        pretrain.run(cfg)
    elif command == "train":
        from bertjob import train

        train.run(cfg)
    elif command in ("infer", "evaluate"):
        from bertjob import infer

        infer.run(cfg, evaluate=command == "evaluate")
    else:
        from bertjob import pipeline

        pipeline.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
