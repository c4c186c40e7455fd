"""Run a hyper-parameter search (:mod:`sdeseg.search`) with Ray Tune; every trial is a real
Ray Train run of any stage.

Ray 2.60's Train V2 + Tune pattern: a trial is a small driver function (``_trial``) holding no
CPU (it asks for one unit of the custom resource ``TRAIN_DRIVER``), which builds the trial's
config and calls :func:`sdeseg.launch.run_on_ray` with ``TuneReportCallback``: every
``ctx.report`` of the stage (validation metrics with ``step``) reaches Tune, so ASHA stops weak
trials at its milestones. The Train run of a trial is named after the search and the trial id
and its run directory is ``<out>/trials/<trial id>``: a retried trial, or a search resumed
after the driver was stopped, continues from the trial's own latest checkpoint. Re-running
the same command restores the Tune experiment (``<out>/tune/<name>``, or
``<runtime.storage_path>/tune/<name>`` on object storage) and runs only what is unfinished.
With ``reuse`` directories (``sdeseg tune --reuse``), a trial whose config a finished run there
already trained (up to run name and storage) copies that run instead of training it.

Results: ``<out>/results.parquet`` (one row per trial: parameters, the metric at every
validation, final and best metric, the test split's score of a completed trial's final model,
steps done, status, wall time), ``<out>/best.json`` (chosen on validation) and
``<out>/summary.md`` with ``<out>/curves.png`` (the metric over steps per trial) and, when the
search file has ``plot``, ``<out>/plot.png`` (the final model's metric over ``plot.x`` per ``plot.series``:
test solid, last validation dashed). When the search has seeds (``compare``, :class:`sdeseg.search.Compare`),
``<out>/over_seeds.parquet`` and a section of ``summary.md`` give each row's mean over seeds with
its 95% interval and, against a baseline row, the seed-paired difference (:mod:`sdeseg.stats`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from sdeseg.search import SearchSpec, load_search

log = logging.getLogger("sdeseg")
DRIVER_RESOURCE = "TRAIN_DRIVER"  # a trial's driver holds one of these and no CPU


def _trial(config: dict[str, Any], search_path: str, extra: list[str], out: str, reuse: list[str] = ()) -> None:
    """One trial (runs in a Tune actor): build its config and train it with Ray Train, or adopt a
    finished run of the same config from the ``reuse`` directories."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sdeseg.launch import finished_run, run_on_ray

    spec = load_search(search_path, extra)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = spec.trial_config(config)
    cfg.runtime.run_name = f"{spec.name}-{trial_id}"  # a retried or resumed trial finds its checkpoints
    cfg.runtime.storage_path = cfg.runtime.storage_path or str(Path(out) / "ray")
    run_dir = Path(out) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    done = finished_run(cfg, run_dir)
    if done is not None:  # it ended before the driver was stopped, but Tune had not recorded it yet
        log.info("trial %s finished before (%s): reporting its summary, not training it again", trial_id,
                 run_dir / "summary.json")
    source = find_reusable(cfg, [Path(d) for d in reuse]) if done is None else None
    if source is not None:
        log.info("trial %s: %s trained this config already, reusing it", trial_id, source)
        done = adopt_run(cfg, source, run_dir)
    if done is not None:
        ray.tune.report({k: v for k, v in done.items() if isinstance(v, (int, float))} | {"step": done["steps"]})
        return
    run_on_ray(cfg, run_dir, callbacks=[TuneReportCallback()])


REUSED_FILE = "reused_from.json"


def find_reusable(cfg, dirs: list[Path]) -> Path | None:
    """A finished run with ``cfg`` up to its name and storage (``launch.RESULT_NEUTRAL``) and all
    its steps, in ``dirs``: each a run directory, a search's output (``trials/*``) or a directory
    of run directories. The first in that order; None when there is none."""
    from sdeseg.launch import finished_run

    for d in dirs:
        for run_dir in [d, *sorted(d.glob("trials/*")), *sorted(d.glob("*"))]:
            if ((run_dir / "summary.json").is_file() and not (run_dir / REUSED_FILE).exists()
                    and finished_run(cfg, run_dir, any_identity=True)):
                return run_dir
    return None


def adopt_run(cfg, source: Path, run_dir: Path) -> dict[str, Any]:
    """Copy the finished run ``source`` (metrics, summary, exports, evaluations; not its Ray
    checkpoints, which stay with it) into ``run_dir`` as this config's run and return its summary,
    whose export paths name the copies. ``run_dir/reused_from.json`` says where it came from; the
    summary is written last, so a copy cut short is not a finished run."""
    import shutil

    from sdeseg.config import save_config
    from sdeseg.launch import _write_summary, preflight

    for item in sorted(source.iterdir()):
        if item.name in ("summary.json", "config.yaml", "ray", "params.json", REUSED_FILE):
            continue
        if item.is_dir():
            shutil.copytree(item, run_dir / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, run_dir / item.name)
    save_config(preflight(cfg), run_dir / "config.yaml")  # this trial's config: a resumed search knows it
    (run_dir / REUSED_FILE).write_text(json.dumps({"source": str(source.resolve())}) + "\n")
    summary = json.loads((source / "summary.json").read_text())
    old, new = str(source.resolve()), str(run_dir.resolve())
    summary["exports"] = {k: v.replace(old, new, 1) if isinstance(v, str) and v.startswith(old) else v
                          for k, v in (summary.get("exports") or {}).items()}
    summary["reused_from"] = old
    _write_summary(run_dir, summary)
    return summary


def _param_space(spec: SearchSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for d in spec.space:
        if d.kind == "grid":
            space[d.key] = tune.grid_search(d.values)
        elif d.kind == "choice":
            space[d.key] = tune.choice(d.values)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(d.low, d.high)
        else:
            space[d.key] = tune.loguniform(d.low, d.high)
    for group, options in spec.groups.items():
        space[group] = tune.grid_search(list(options))
    return space


def _search_alg(spec: SearchSpec):
    if spec.search != "optuna":
        return None  # BasicVariantGenerator: grids crossed with num_samples random draws
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:  # pragma: no cover - optuna is in the dev and tune extras
        raise RuntimeError("search.name=optuna needs optuna: pip install 'sdeseg[optuna]'") from e
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=spec.max_concurrent)


def _scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=spec.max_steps(), grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def ensure_tune_cluster(spec: SearchSpec) -> None:
    """Connect to ``RAY_ADDRESS`` (its nodes must offer ``TRAIN_DRIVER``; the cluster manifests'
    head does) or start a local cluster with one ``TRAIN_DRIVER`` per concurrent trial."""
    import ray

    from sdeseg.runtime.cluster import start_local_cluster

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        have = ray.cluster_resources().get(DRIVER_RESOURCE, 0)
        if have < 1:
            from sdeseg.config import ConfigError

            raise ConfigError(f"the Ray cluster at {address} offers no {DRIVER_RESOURCE} resource for the trials' "
                              f"drivers: start a node with --resources='{{\"{DRIVER_RESOURCE}\": 8}}' (the RayCluster "
                              "of cluster/ does this on its head)")
        return
    start_local_cluster(os.cpu_count() or 1, resources={DRIVER_RESOURCE: spec.max_concurrent}, log_to_driver=True)


def experiment_root(spec: SearchSpec, out: Path) -> str:
    """Where Tune keeps the search's state: beside the trials' checkpoints when they go to object
    storage (``<runtime.storage_path>/tune``: a new driver pod resumes the search), else ``<out>/tune``."""
    from sdeseg.config import load_config
    from sdeseg.storage import is_url

    storage = load_config(spec.base, spec.overrides).runtime.storage_path
    return f"{storage.rstrip('/')}/tune" if is_url(storage) else str(out / "tune")


def run_search(search_path: str, out: str | Path, extra: list[str] | None = None,
               reuse: list[str | Path] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run (or resume) the search; returns the best trial's row and every trial's row (their
    ``status`` says whether the search ended: an interrupted one has unfinished trials). The search
    file is checked first. A trial whose config a finished run in ``reuse`` (see
    :func:`find_reusable`) already trained adopts that run instead of training."""
    spec = load_search(search_path, extra)
    reuse = [str(Path(d).resolve()) for d in (reuse or [])]
    missing = [d for d in reuse if not Path(d).is_dir()]
    if missing:
        from sdeseg.config import ConfigError

        raise ConfigError(f"--reuse: not a directory: {', '.join(missing)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # checkpoint-only reports lack the metric
    ensure_tune_cluster(spec)
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, search_path=spec.path, extra=list(extra or []), out=str(out), reuse=reuse),
        {"cpu": 0, DRIVER_RESOURCE: 1},
    )
    tune_root = experiment_root(spec, out)
    experiment = f"{tune_root}/{spec.name}"
    start = time.time()
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the search in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec),
                                        search_alg=_search_alg(spec), num_samples=spec.num_samples,
                                        max_concurrent_trials=spec.max_concurrent),
            run_config=tune.RunConfig(name=spec.name, storage_path=tune_root,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    grid = tuner.fit()
    rows = collect_results(spec, grid, out)
    best = write_results(spec, rows, out)
    log.info("search %s: %d trials in %.0f s; best %s = %s", spec.name, len(rows), time.time() - start, spec.metric,
             best.get("final"))
    return best, rows


def _tune_statuses(grid) -> list[str | None]:
    """Tune's status of each trial in ``grid``'s order (TERMINATED, ERROR, PAUSED, PENDING, RUNNING).
    Ray 2.60's ResultGrid keeps it only on its analysis (``num_terminated`` counts from there too);
    None per trial where that is not available."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)
    if trials is None or len(trials) != len(grid):
        return [None] * len(grid)
    return [str(t.status) for t in trials]


def unfinished_trials(spec: SearchSpec, rows: list[dict[str, Any]]) -> int:
    """How many of the search's trials have not ended: those in ``rows`` an interruption cut, plus
    those Tune never created (it generates trials as slots free up, so an interrupted search has
    fewer rows than the grid times ``num_samples``)."""
    return sum(r["status"] == "unfinished" for r in rows) + max(0, spec.num_trials() - len(rows))


def collect_results(spec: SearchSpec, grid, out: Path) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid. ``status``: completed (the run ended and wrote its
    summary), stopped early (the scheduler ended it), error, or unfinished (an interrupted search:
    re-running the same command continues it)."""
    rows = []
    for result, tune_status in zip(grid, _tune_statuses(grid)):
        metrics = result.metrics or {}
        named = re.search(r"_trial_([0-9a-f]+_\d+)_", Path(result.path).name) if result.path else None
        trial_id = metrics.get("trial_id") or (named.group(1) if named else "")
        steps, values = metric_history(out / "trials" / str(trial_id), spec.metric, result.metrics_dataframe)
        params = {k: result.config.get(k) for k in [d.key for d in spec.space] + list(spec.groups)}
        done = int(max(steps, default=0))
        summary_file = out / "trials" / str(trial_id) / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        reused = summary.get("reused_from")
        test = summary.get(f"test/{spec.metric}")  # the final model on the held-out split (claims)
        if result.error is not None:
            status = "error"
        elif summary_file.exists():  # written when the run ends; a trial the scheduler stopped never ends
            status = "completed"
        elif tune_status in (None, "TERMINATED"):
            status = "stopped early"
        else:  # PAUSED or PENDING: the search was interrupted before this trial ended
            status = "unfinished"
        best = (max(values) if spec.mode == "max" else min(values)) if values else None
        rows.append({"trial_id": str(trial_id), **{f"param/{k}": v for k, v in params.items()},
                     "steps": steps, "values": values, "final": values[-1] if values else None, "best": best,
                     "test": float(test) if test is not None else None,
                     "steps_done": done, "status": status, "wall_s": float(metrics.get("time_total_s") or 0.0),
                     "run_dir": str(out / "trials" / str(trial_id)), "reused_from": reused,
                     "error": str(result.error)[:500] if result.error is not None else None})
    return rows


def metric_history(run_dir: Path, metric: str, dataframe=None) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` at every validation of a trial: from its run's metrics.jsonl
    (one record per step, also across restarts and a resumed search), else from Tune's results."""
    log = run_dir / "metrics.jsonl"
    by_step: dict[int, float] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("kind") == "val" and metric in record:
                by_step[int(record["step"])] = float(record[metric])
    elif dataframe is not None and metric in dataframe and "step" in dataframe:
        # validations only (the run's final report repeats the last one without a step)
        h = dataframe[dataframe[metric].notna() & dataframe["step"].notna()]
        by_step = {int(st): float(v) for st, v in zip(h["step"], h[metric])}
    return sorted(by_step), [by_step[st] for st in sorted(by_step)]


def write_results(spec: SearchSpec, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.parquet, best.json, summary.md and the plots; returns the best row."""
    _write_parquet([{k: (json.dumps(v) if k.startswith("param/") else v) for k, v in r.items()} for r in rows],
                   out / "results.parquet")
    scored = [r for r in rows if r["final"] is not None]
    sign = 1 if spec.mode == "max" else -1
    best = max(scored, key=lambda r: sign * r["final"]) if scored else {}
    table = over_seeds(spec, rows) if spec.compare is not None else None
    chosen = {"over_seeds": best_over_seeds(spec, table)} if table else {}
    (out / "best.json").write_text(json.dumps({"metric": spec.metric, "mode": spec.mode, **best, **chosen},
                                              indent=1, default=str))
    _plots(spec, rows, out)
    lines = [f"# Search `{spec.name}` ({spec.path})", "",
             f"{len(rows)} trials; metric `{spec.metric}` ({spec.mode}); scheduler {spec.scheduler.name}; "
             f"search {spec.search}; base `{spec.base}` with {' '.join(spec.overrides) or 'no overrides'}.", "",
             "| trial | " + " | ".join(k for k in rows[0] if k.startswith("param/")) + " | final | best | test | "
             "steps | status | wall s |" if rows else "(no trials)",
             "| --- |" + " --- |" * (len([k for k in rows[0] if k.startswith("param/")]) + 6) if rows else ""]
    for r in sorted(rows, key=lambda r: -sign * (r["final"] if r["final"] is not None else -sign * 1e30)):
        params = " | ".join(str(v) for k, v in r.items() if k.startswith("param/"))
        final = f"{r['final']:.4f}" if r["final"] is not None else "–"
        best_v = f"{r['best']:.4f}" if r["best"] is not None else "–"
        test = f"{r['test']:.4f}" if r.get("test") is not None else "–"
        lines.append(f"| {r['trial_id']} | {params} | {final} | {best_v} | {test} | {r['steps_done']} | "
                     f"{r['status']}{' (reused)' if r.get('reused_from') else ''} | {r['wall_s']:.0f} |")
    if table is not None:
        _write_parquet([{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in e.items()}
                        for e in table], out / "over_seeds.parquet")
        lines += ["", *over_seeds_lines(spec, table)]
        if chosen["over_seeds"]:
            b = chosen["over_seeds"]
            test = "–" if b["test_mean"] is None else f"{b['test_mean']:.4f}"
            lines += ["", f"Best row on validation, mean over its {b['val_n']} seeds (`best.json` `over_seeds`): "
                      + ", ".join(f"{k} = {v}" for k, v in b["params"].items())
                      + f" (val {b['val_mean']:.4f}, test {test})."]
    lines += ["", "![metric over steps](curves.png)"] + (["", "![final metric](plot.png)"] if spec.plot else [])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return best


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows`` (flat, one type per column) as a parquet file, written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def over_seeds(spec: SearchSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per combination of the searched values other than ``spec.compare.seeds``, over the
    completed trials: ``params``, ``seeds``, the final model's ``test`` and the last validation
    (``val``) as :class:`sdeseg.stats.Interval` fields (``test_mean``, ``test_low``, ...), and,
    with a baseline, the seed-paired ``test − baseline`` (``diff_*``, ``diff_per_seed``; None for
    the baseline itself or where it shares no completed seed). Trials stopped early or cut are
    left out: their final metric is not at the same step."""
    from sdeseg.stats import mean_interval, paired_difference

    seeds_key, baseline = spec.compare.seeds, spec.compare.baseline

    def row_key(params: dict[str, Any]) -> str:  # values may be lists (a grid of budgets)
        return json.dumps(params, sort_keys=True, default=str)

    by_row: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["status"] != "completed":
            continue
        params = {k[len("param/"):]: v for k, v in r.items() if k.startswith("param/") and k != f"param/{seeds_key}"}
        entry = by_row.setdefault(row_key(params), {"params": params, "test": {}, "val": {}})
        seed = r.get(f"param/{seeds_key}")
        for split, value in (("test", r.get("test")), ("val", r["final"])):
            if value is not None:
                entry[split][seed] = float(value)
    table = []
    for key, entry in by_row.items():
        params = entry["params"]
        out: dict[str, Any] = {"params": params, "seeds": sorted(entry["test"] or entry["val"], key=str)}
        for split in ("test", "val"):
            out |= _flat(split, mean_interval(list(entry[split].values())) if entry[split] else None)
        base = row_key({**params, **baseline}) if baseline else None
        diff, per = None, None
        if base is not None and base != key and base in by_row and set(entry["test"]) & set(by_row[base]["test"]):
            diff, per = paired_difference(entry["test"], by_row[base]["test"])
        out |= _flat("diff", diff) | {"diff_per_seed": {str(k): v for k, v in per.items()} if per else None}
        table.append(out)
    return table


INTERVAL_FIELDS = ("n", "mean", "sd", "low", "high")


def _flat(prefix: str, iv) -> dict[str, Any]:
    """An :class:`sdeseg.stats.Interval` (or None) as the columns ``<prefix>_n``, ``_mean``, ...
    of :func:`over_seeds` (None where there is no interval)."""
    return {f"{prefix}_{f}": getattr(iv, f) if iv is not None else None for f in INTERVAL_FIELDS}


def best_over_seeds(spec: SearchSpec, table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of :func:`over_seeds` with the best mean validation among the rows completed in the
    most seeds (a row with fewer seeds is not compared on a different average); None when none has
    a validation. Chosen on ``val``, never on ``test``."""
    scored = [e for e in table if e["val_mean"] is not None]
    if not scored:
        return None
    most = max(e["val_n"] for e in scored)
    sign = 1 if spec.mode == "max" else -1
    return max((e for e in scored if e["val_n"] == most), key=lambda e: sign * e["val_mean"])


def over_seeds_lines(spec: SearchSpec, table: list[dict[str, Any]]) -> list[str]:
    """The summary's section of :func:`over_seeds`, best test mean first."""
    from sdeseg.stats import Interval

    c = spec.compare
    names = list(table[0]["params"]) if table else []
    base = ", ".join(f"{k} = {v}" for k, v in c.baseline.items())

    def interval(e: dict, p: str) -> str:
        if e[f"{p}_mean"] is None:
            return "–"
        return Interval(**{f: e[f"{p}_{f}"] for f in INTERVAL_FIELDS}).format(4, signed=p == "diff")

    lines = [f"## Over seeds (`{c.seeds}`)", "",
             "Completed trials only. Mean over seeds with its 95% Student-t interval; `test` is the final model "
             "on the held-out split (claims), `val` its last validation (development)"
             + (f"; `test − baseline` is paired seed by seed with the baseline row ({base}, the other values the "
                "row's own); an interval that excludes 0 says these seeds resolve the difference." if c.baseline
               else "."), ""]
    head = [*names, "seeds", "test [95%]", "val [95%]"] + (["test − baseline [95%]", "per seed"] if c.baseline else [])
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    sign = 1 if spec.mode == "max" else -1
    for e in sorted(table, key=lambda e: -sign * (e["test_mean"] if e["test_mean"] is not None else -sign * 1e30)):
        cells = [str(e["params"][k]) for k in names] + [str(len(e["seeds"])), interval(e, "test"), interval(e, "val")]
        if c.baseline:
            per = e["diff_per_seed"]
            cells += [interval(e, "diff") if per else "(baseline)" if all(
                e["params"].get(k) == v for k, v in c.baseline.items()) else "–",
                ", ".join(f"{v:+.4f}" for v in per.values()) if per else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plots(spec: SearchSpec, rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["steps"]:
            ax.plot(r["steps"], r["values"], marker="o", label=r["trial_id"])
    ax.set_xlabel("step")
    ax.set_ylabel(spec.metric)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    if not spec.plot:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    colours: dict[str, str] = {}
    for (name, split), points in plot_lines(spec, rows).items():
        colour = colours.setdefault(name, f"C{len(colours)}")
        ax.plot(list(points), list(points.values()), marker="o", color=colour,
                linestyle="-" if split == "test" else "--", label=f"{name} ({split})")
    ax.set_xscale("log")
    ax.set_xlabel(spec.plot.get("x"))
    ax.set_ylabel(f"{spec.metric} (final model, mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)


def plot_lines(spec: SearchSpec, rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[float, float]]:
    """The lines of plot.png: {(series value, "test" | "val"): {x: mean over the completed trials}}.

    "test" is the final model's score on the held-out split (what a claim uses), "val" its last
    validation (for development); trials that did not complete are left out."""
    x, series = spec.plot.get("x"), spec.plot.get("series")
    points: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in rows:
        if r["status"] != "completed":
            continue
        key = str(r.get(f"param/{series}")) if series else spec.metric
        for split, value in (("test", r.get("test")), ("val", r["final"])):
            if value is not None:
                points.setdefault((key, split), {}).setdefault(float(r[f"param/{x}"]), []).append(value)
    return {line: {v: sum(by_x[v]) / len(by_x[v]) for v in sorted(by_x)} for line, by_x in sorted(points.items())}
