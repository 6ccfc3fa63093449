"""Pipeline: prepare -> [pretrain] -> train -> evaluate (test split) -> infer, as one job with one summary.

A rerun reuses each stage whose inputs and settings are unchanged, and resumes one that was
interrupted (train from its latest checkpoint, infer/evaluate from their committed files).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection
from typing import Any

from bertjob import infer, models, prepare, pretrain, train
from bertjob.cluster import init_ray
from bertjob.config import STAGES, InferConfig, PipelineConfig, PrepareConfig, TrainConfig, to_dict
from bertjob.identity import identity, model_fingerprint
from bertjob.outputs import MANIFEST, ensure_output, releasing
from bertjob.sources import Corpus, InputError, prepared_files
from bertjob.storage import check_access, exists, filesystem, for_workers, join, read_json, write_json

log = logging.getLogger(__name__)


def _prepared_is_current(cfg: PrepareConfig, corpus: Corpus) -> dict[str, Any] | None:
    """The prepared output's manifest when it was made from this very input content and settings."""
    path = join(cfg.output, MANIFEST)
    if not exists(path):
        return None
    manifest = read_json(path)
    fingerprint = models.tokenizer_info(cfg.model, cfg.trust_remote_code)["fingerprint"]
    if manifest.get("identity") != prepare.identity_of(cfg, corpus, fingerprint):
        return None
    fs, where = filesystem(cfg.output)
    try:  # a shard deleted or changed since: its rows were missing from every later stage
        for split in manifest.get("splits", {}):
            prepared_files(fs, where, split, manifest)
    except InputError as err:
        log.warning("pipeline: preparing again: %s", err)
        return None
    return manifest


# What the pipeline writes under output_dir: a directory holding only these is adopted as its own.
OWN_ENTRIES = ("prepared", "train", "evaluate", "infer", "checkpoints", "summary.json")


# Settings of how a run executes, not of what it learns: `bertjob train` resumes a run under one
# --name whatever they are. In the run key they started a fresh run: a pipeline rerun after Ctrl-C
# with fewer workers or a smaller micro-batch (after running out of memory) trained from step 0,
# and a finished one retrained from scratch for another log interval (or, after a Ctrl-C, for
# checkpoints every 50 steps instead of each epoch: the interrupted run's progress was left behind).
EXECUTION = (
    "num_workers", "cpus_per_worker", "torch_threads", "malloc_tuning", "micro_batch_size", "log_every_steps",
    "max_failures", "placement_timeout_s", "resize_check_s", "check_resources", "resume_changed",
    "sample_log", "tracking", "keep_checkpoints", "checkpoint_every_steps", "compile",
)  # fmt: skip


def _run_settings(cfg: Any) -> dict[str, Any]:
    """The settings in a train or pretrain run's identity: those that shape its model."""
    ignored = ("data", "output", "name", "storage_path", *EXECUTION)
    return {k: v for k, v in to_dict(cfg).items() if k not in ignored}


def _run_key(cfg: Any, manifest: dict[str, Any]) -> str:
    """A train or pretrain run's identity: the prepared data's, the settings that shape its model,
    its starting weights."""
    return identity(manifest["identity"], _run_settings(cfg), model_fingerprint(cfg.model))[:10]


def keyed_run(cfg: Any, manifest: dict[str, Any]) -> Any:
    """A train or pretrain run as the pipeline names it: NAME-KEY, KEY its identity (the prepared
    data's, the settings, the starting weights), so that changed data or settings start a new run
    while an interrupted identical one resumes from its checkpoints."""
    return dataclasses.replace(cfg, name=f"{cfg.name}-{_run_key(cfg, manifest)}")


def stage_run(cfg: Any, stage: str) -> Any:
    """`bertjob train|pretrain --config PIPELINE_FILE`: the pipeline's run of that stage, under its
    name. It trained run NAME, another run than the pipeline's NAME-KEY: from step 0 where the
    pipeline's was interrupted, replacing the model of its finished one. Data not prepared yet
    keeps NAME (the stage says what to run)."""
    check_access({"data": cfg.data})
    path = join(cfg.data, MANIFEST)
    manifest = read_json(path) if exists(path) else {}
    if "identity" not in manifest:
        return cfg
    cfg = keyed_run(cfg, manifest)
    if note := _new_run_note(cfg, stage, cfg.storage_path):
        log.info("%s", note)
    return cfg


def _new_run_note(cfg: Any, stage: str, storage: str) -> str | None:
    """What a run of another identity than the one whose model OUTPUT holds is about to do: with
    another --train.epochs the pipeline trained a new run from step 0 and replaced the model without
    a word, where a user expected the finished run to be extended."""
    path = join(cfg.output, "metrics.json")
    earlier = (read_json(path) if exists(path) else {}).get("config") or {}
    if not earlier.get("name") or earlier["name"] == cfg.name:
        return None
    # As the run records them: the model's path absolute, lr 0 resolved by model width.
    now = {**_run_settings(cfg), "model": for_workers(cfg.model)}
    changed = [f"{k} {earlier[k]!r} -> {v!r}" for k, v in now.items()
               if k in earlier and earlier[k] != v and not (k == "lr" and not v)]  # fmt: skip
    why = ", ".join(changed) or "its prepared data, starting model or name differ"
    done = train.latest_checkpoint(join(storage, cfg.name))  # this run, interrupted or finished before
    step = done.get("step", 0)
    how = (f"run {cfg.name} has finished its {step} steps" if done.get("final") else
           f"resuming run {cfg.name} at step {step}" if step else f"training run {cfg.name} from step 0")  # fmt: skip
    return (f"{stage}: {cfg.output} holds the model of run {earlier['name']} ({why}): {how} (a changed "
            f"{stage} setting starts a new run, never extends one); its model will replace that one, whose "
            f"checkpoints stay in {earlier.get('storage_path') or storage}")  # fmt: skip


def _finished(cfg: Any) -> dict[str, Any] | None:
    """The metrics of a finished pretrain or train run of exactly this name (its model exported), else None."""
    path = join(cfg.output, "metrics.json")
    metrics = read_json(path) if exists(path) else None
    if (
        metrics is not None
        and metrics.get("config", {}).get("name") == cfg.name
        and exists(join(cfg.output, "model"))
    ):
        if problem := _model_problem(join(cfg.output, "model"), classifier=isinstance(cfg, TrainConfig)):
            # Handed on, it failed evaluate with an error naming a directory the pipeline wrote, or
            # (bertjob.json removed) scored text at prepare's defaults, not as it was trained.
            log.warning("pipeline: %s; exporting the run's model again", problem)
            return None
        return metrics
    return None


def _model_problem(model_dir: str, classifier: bool) -> str | None:
    """What a stage's exported model has lost since it was written (a file removed or cut short)."""
    if not exists(join(model_dir, "bertjob.json")):
        return f"model {model_dir}: no bertjob.json"
    if not classifier:
        return models.weights_problem(model_dir)
    try:
        infer.model_settings(model_dir)
    except models.ModelError as err:
        return str(err)
    return next(iter(infer.check_model(model_dir)), None)


def scoring_stages(cfg: PipelineConfig, splits: Collection[str]) -> dict[str, InferConfig]:
    """The evaluate and infer runs, given the splits of the prepared data: evaluate reads its test
    split (skipped without one), infer the corpus to score, else the unsup split, else test. A
    pipeline left with nothing to score at its end is an InputError, raised before any work when
    the corpus' splits are known (all but an IMDb tar's), else before training."""
    prepared = cfg.path("prepared")
    stages = {stage: cfg.stage(stage) for stage in ("evaluate", "infer")}
    tokenized = cfg.stage("prepare").text_settings().as_dict()
    for stage, s_cfg in stages.items():  # infer.describe's checks, before any work
        if s_cfg.input == prepared and s_cfg.include_text:
            raise InputError(
                f"the {stage} stage scores the prepared data, which keeps token ids, not text; "
                f"--{stage}.include-text needs a corpus to score: --infer-input CORPUS (evaluate: "
                f"--evaluate.input LABELLED_CORPUS)"
            )
        # `evaluate: {max_length: 256}` beside a top-level 128: an error once training had finished
        differ = [f"{k} {getattr(s_cfg, k)!r} (prepare: {v!r})" for k, v in tokenized.items()
                  if getattr(s_cfg, k) not in (0, "", None) and getattr(s_cfg, k) != v]  # fmt: skip
        if s_cfg.input == prepared and differ:
            raise InputError(
                f"the {stage} stage scores the prepared data, tokenized as prepare was set; its own "
                f"{', '.join(differ)} would need the text again: set these for prepare (at the top level "
                f"or --prepare.KEY), or give the {stage} stage a corpus of its own"
            )
    if stages["evaluate"].input == prepared and stages["evaluate"].split not in splits:
        del stages["evaluate"]
    scored = stages["infer"]
    if scored.input == prepared and scored.split == "unsup" and "unsup" not in splits:
        scored = stages["infer"] = dataclasses.replace(scored, split="test")
    if scored.input == prepared and scored.split not in splits:
        if scored.split == "test" and "evaluate" not in stages:
            lacks = "no test split to evaluate on, nor an unsup split to score at the end"
        else:
            lacks = f"no {scored.split} split for the infer stage to score"
        raise InputError(
            f"input {cfg.input}: {lacks} (the prepared splits: {', '.join(sorted(splits))}). Hold out part "
            f"of train as the test split (--prepare.test-fraction 0.2), use a corpus with a test split (an IMDb "
            f"layout with test/pos and test/neg, or Parquet, CSV, TSV or JSONL files in split=test/ and split=train/ "
            f"directories: any other file's rows go to --prepare.split), or name a corpus to score with --infer-input CORPUS: the pipeline then runs "
            f"without evaluate (or evaluates on --evaluate.input LABELLED_CORPUS)"
        )
    return stages


@releasing
def run(cfg: PipelineConfig) -> dict[str, Any]:
    started = time.time()
    check_access({"input": cfg.input, "output_dir": cfg.output_dir, "storage_path": cfg.storage_path,
                  "infer_input": cfg.infer_input})  # fmt: skip
    if problems := train.tracking_problems(cfg.stage("train")):  # now, not after prepare and pretrain
        raise train.TrainSetupError("cannot train:\n  - " + "\n  - ".join(problems))
    p_cfg = cfg.stage("prepare")
    corpus = prepare.open_input(p_cfg)
    if not corpus.labelled:
        # The columns, as a missing text column's error gives them: which one holds the labels?
        columns = f"; the columns are {corpus.header[1]}" if corpus.header[1] else ""
        raise InputError(f"input {cfg.input}: no labels to train on (no column {p_cfg.label_column!r}{columns}); "
                         f"name its label column with --prepare.label-column")  # fmt: skip
    splits = prepare.splits_written(p_cfg, corpus)
    if splits is not None:
        scoring_stages(cfg, splits)  # nothing to score at the end: an error now, not after training
    summary: dict[str, Any] = {"output_dir": cfg.output_dir, "stages": {}}
    ensure_output(cfg.output_dir, "pipeline", own=OWN_ENTRIES)  # never another job's directory

    # 1. prepare
    manifest = _prepared_is_current(p_cfg, corpus)
    reused = manifest is not None
    if reused:
        log.info("pipeline: prepare: reusing %s (same input and settings)", p_cfg.output)
    else:
        init_ray(dashboard=True)  # the Ray that train will share keeps its dashboard
        # Workers the cluster cannot hold, sequences too long for the model: an error now, not
        # after prepare (a pretrain stage's model has its base model's shape).
        t_cfg = cfg.stage("train")
        pt_cfg = cfg.stage("pretrain") if cfg.pretrain_stage else None
        # At prepare's max_length: a prepare section's own (`prepare: {max_length: 1024}`) was not
        # checked, and train refused the data once prepare had written it. Of the model train starts
        # from (`train: {model: X}`; a pretrain stage's has its base model's shape).
        start = pt_cfg or t_cfg
        shape = models.model_config(start.model, start.trust_remote_code)
        train.plan_run(t_cfg, shape, p_cfg.max_length)
        # A pretrain stage's max_length is its own, that of the sequences it packs.
        if pt_cfg and (problems := pretrain.positions_problems(pt_cfg, shape)):
            raise pretrain.PretrainSetupError("cannot pretrain:\n  - " + "\n  - ".join(problems))
        manifest = prepare.run(p_cfg, in_pipeline=True, corpus=corpus)
    summary["stages"]["prepare"] = stage_summary(
        p_cfg.output, reused, rows={k: v["rows_written"] for k, v in manifest["splits"].items()},
        rows_quarantined=manifest["rows_quarantined"],
        rows_per_s=round(manifest["rows_read"] / manifest["wall_s"], 1) if manifest.get("wall_s") else None,
    )  # fmt: skip
    # A reused output's: prepare.run said the same of its own
    if problem := prepare.nothing_kept(cfg.input, p_cfg.output, manifest, "train", True):
        raise InputError(problem)
    scoring = scoring_stages(cfg, manifest["splits"])  # an IMDb tar's splits are known from here on

    # 1b. pretrain (optional, off by default): masked-LM on the prepared unsup+train text; train then
    #     starts from its model. Its run name carries its identity, as train's below.
    if cfg.pretrain_stage:
        pt_cfg = keyed_run(cfg.stage("pretrain"), manifest)
        pt_metrics, reused = _finished(pt_cfg), True
        if pt_metrics is None:
            if note := _new_run_note(pt_cfg, "pretrain", pt_cfg.storage_path):
                log.info("pipeline: %s", note)
            pt_metrics, reused = pretrain.run(pt_cfg, in_pipeline=True), False
        else:
            log.info("pipeline: pretrain: reusing %s (same data and settings)", pt_cfg.output)
        summary["stages"]["pretrain"] = stage_summary(
            pt_cfg.output, reused, mlm_loss=pt_metrics["final_mlm_loss"],
            perplexity=pt_metrics["final_perplexity"], samples_per_s=pt_metrics["train_samples_per_s"],
        )  # fmt: skip

    # 2. train: the run name carries its identity (the prepared data's, the settings, the starting
    #    weights: a new pre-trained model is a new run), so changed data or settings start a new
    #    run while an interrupted identical one resumes from its checkpoints.
    t_cfg = keyed_run(cfg.stage("train"), manifest)
    metrics = _finished(t_cfg)
    if metrics is not None:
        log.info("pipeline: train: reusing %s (same data and settings)", t_cfg.output)
        reused = True
    else:
        if note := _new_run_note(t_cfg, "train", t_cfg.storage_path):
            log.info("pipeline: %s", note)
        metrics, reused = train.run(t_cfg, in_pipeline=True), False
    summary["stages"]["train"] = stage_summary(
        t_cfg.output, reused, best_val_accuracy=metrics["best_val_accuracy"],
        test_accuracy=(metrics.get("test") or {}).get("accuracy"), samples_per_s=metrics["train_samples_per_s"],
    )  # fmt: skip

    # 3. evaluate on the test split, 4. infer on the corpus to score (completed runs are reused).
    if "evaluate" not in scoring:
        log.info("pipeline: evaluate: the prepared data has no test split; skipped")
    for stage, s_cfg in scoring.items():
        # An output from other inputs or settings (a retrained model, include_text...) is redone.
        out, reused = infer.score(s_cfg, evaluate=stage == "evaluate", replace_changed=True)
        summary["stages"][stage] = stage_summary(
            s_cfg.output, reused, rows_scored=out["rows_scored"], rows_quarantined=out["rows_quarantined"],
            rows_per_s=out["rows_per_s"], **({"accuracy": out["metrics"]["accuracy"]} if "metrics" in out else {}),
        )  # fmt: skip
    summary["wall_s"] = round(time.time() - started, 1)
    summary["config"] = settings_record(cfg)
    write_json(join(cfg.output_dir, "summary.json"), summary)
    print_summary(summary)
    return summary


def stage_summary(output: str, reused: bool, **numbers: Any) -> dict[str, Any]:
    """A stage's section of summary.json: its output, whether this run kept it as it was (same inputs
    and settings) or ran the stage, and its numbers. Evaluate's and infer's said nothing of reuse: a
    script could not tell whether they had been redone."""
    return {"output": output, "reused": reused, **numbers}


def settings_record(cfg: PipelineConfig) -> dict[str, Any]:
    """The pipeline's settings as summary.json keeps them: each stage section's values as its stage
    reads them (`--train.lr 3e-5` is the number 3e-05 there, not the flag's text)."""
    record = to_dict(cfg)
    for name in STAGES:
        if record.get(name):
            typed = to_dict(cfg.stage(name))
            record[name] = {key: typed[key] for key in record[name]}
    return record


def print_summary(summary: dict[str, Any]) -> None:
    st = summary["stages"]
    lines = ["", "bertjob pipeline summary", "-" * 60]
    if "prepare" in st:
        p = st["prepare"]
        rows = ", ".join(f"{k} {v}" for k, v in p["rows"].items())
        if p.get("rows_quarantined"):  # left out of every split: the count, as infer's line gives it
            rows += f"; {p['rows_quarantined']} quarantined"
        lines.append(f"prepare   {rows}  ({_speed(p, 'rows_per_s', 'rows/s')})  -> {p['output']}")
    if "pretrain" in st:
        p = st["pretrain"]
        lines.append(
            f"pretrain  MLM loss {p['mlm_loss']:.4f}, perplexity {p['perplexity']:.2f}  ({_speed(p, 'samples_per_s', 'sequences/s')})  -> {p['output']}/model"
        )
    if "train" in st:
        t = st["train"]
        test = f"{t['test_accuracy']:.4f}" if t["test_accuracy"] is not None else "n/a"
        val = f"{t['best_val_accuracy']:.4f}" if t["best_val_accuracy"] is not None else "n/a"
        lines.append(
            f"train     val acc {val}, test acc {test}  ({_speed(t, 'samples_per_s', 'samples/s')})  -> {t['output']}/model"
        )
    if "evaluate" in st:
        e = st["evaluate"]
        lines.append(
            f"evaluate  accuracy {e['accuracy']:.4f} on {e['rows_scored']} test reviews  ({_speed(e, 'rows_per_s', 'rows/s')})  -> {e['output']}"
        )
    if "infer" in st:
        i = st["infer"]
        lines.append(
            f"infer     {i['rows_scored']} reviews scored, {i['rows_quarantined']} quarantined  ({_speed(i, 'rows_per_s', 'rows/s')})  -> {i['output']}"
        )
    lines.append(f"total {summary['wall_s']} s; summary in {join(summary['output_dir'], 'summary.json')}")
    print("\n".join(lines), flush=True)


def _speed(stage: dict[str, Any], key: str, unit: str) -> str:
    """A stage's speed, or that it was reused: a rerun's summary gave the earlier run's speed beside
    a total of 0.2 s, as if this run had measured it."""
    return f"reused, {stage[key]} {unit} when it ran" if stage["reused"] else f"{stage[key]} {unit}"
