"""Hyper-parameter search files (``sdeseg tune SEARCH.yaml``): parsed, typed and checked before
anything starts, like presets.

A search file::

    base: demo_semiseg               # the preset every trial trains (any stage)
    overrides: [train.steps=400]     # fixed for every trial (the command line adds more)
    space:                           # config key -> distribution
      semiseg.pseudo_threshold: {uniform: [0.9, 0.99]}
      semiseg.unsup_weight: {loguniform: [0.1, 3.0]}
      semiseg.ema_alpha_max: {choice: [0.99, 0.999]}
      train.seed: {grid: [0, 1]}     # a grid dimension: every value, crossed with the samples
    groups:                          # named override sets, each group a grid dimension; an
      row:                           # override may name a searched key's value: {data.num_labeled}
        supervised: [semiseg.pseudo_label=false, semiseg.mix=none]
        depthmix: [semiseg.mix=depthmix]
    metric: seg/miou                 # a key the stage validates (seg/*, teacher/*, depth/*)
    mode: max
    scheduler: {name: asha, grace_period: 100, max_t: 400, reduction_factor: 2}   # or {name: fifo}
    search: {name: random, num_samples: 4}     # random | grid | optuna (TPE)
    resources: {num_workers: 2, cpus_per_worker: 0.5, gpus_per_worker: 0}
    max_concurrent: 2
    plot: {x: data.num_labeled, series: row}  # optional: the metric over x, one line per series
    compare: {seeds: train.seed, baseline: {row: supervised}}  # optional: rows over seeds, paired
                                     # against the baseline row with the same other values (default:
                                     # over train.seed when it is a grid of 2 or more, no baseline)

Every value of every space and group is applied to the base config once here, so an unknown
key or an impossible value is refused before Ray starts, naming the key. Nothing here imports ray.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdeseg.config import Config, ConfigError, load_config, parse_override, resolve_named_file, resolve_preset

SEARCH_DIR = Path(__file__).resolve().parent.parent / "tune" / "searches"
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
TOP_KEYS = ("base", "overrides", "space", "groups", "metric", "mode", "scheduler", "search", "resources",
            "max_concurrent", "plot", "compare", "name")
STAGE_METRICS = {"sde": ("depth/",), "semiseg": ("seg/", "teacher/"), "ssda": ("seg/", "teacher/"),
                 "select": ("select/",)}


@dataclass
class Dimension:
    """One searched config key: ``kind`` in DISTRIBUTIONS, ``values`` (grid/choice) or ``low``/``high``."""

    key: str
    kind: str
    values: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0


@dataclass
class Scheduler:
    name: str = "fifo"  # "asha" | "fifo"
    grace_period: int = 1
    max_t: int = 0  # 0: the base config's train.steps
    reduction_factor: float = 2.0


@dataclass
class Resources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class Compare:
    """How the summary aggregates seeds: ``seeds`` is the grid key whose values are replicates
    (each other combination of values is one row, reported as a mean over them with its
    interval); ``baseline`` names, for some searched keys or groups, the value of the row each
    row is compared with seed by seed (the others keep the row's own values)."""

    seeds: str = "train.seed"
    baseline: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchSpec:
    path: str
    name: str
    base: str
    overrides: list[str]
    space: list[Dimension]
    groups: dict[str, dict[str, list[str]]]
    metric: str
    mode: str
    scheduler: Scheduler
    search: str
    num_samples: int
    resources: Resources
    max_concurrent: int
    plot: dict[str, str] = field(default_factory=dict)
    compare: Compare | None = None

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        """The overrides of one trial: fixed ones, the resources, then its sampled values and groups."""
        r = self.resources
        out = [*self.overrides, f"runtime.num_workers={r.num_workers}", f"runtime.cpus_per_worker={r.cpus_per_worker}",
               "runtime.in_process=false"]
        if r.gpus_per_worker > 0:
            out += ["runtime.use_gpu=true", f"runtime.gpus_per_worker={r.gpus_per_worker}"]
        for dim in self.space:
            out.append(f"{dim.key}={json.dumps(params[dim.key])}")
        for group, options in self.groups.items():
            out += [fill(o, params) for o in options[params[group]]]
        return out

    def trial_config(self, params: dict[str, Any]) -> Config:
        return load_config(self.base, self.trial_overrides(params))

    def max_steps(self) -> int:
        return self.scheduler.max_t or load_config(self.base, self.overrides).train.steps

    def grid_size(self) -> int:
        sizes = [len(d.values) for d in self.space if d.kind == "grid"] + [len(g) for g in self.groups.values()]
        return math.prod(sizes) if sizes else 1

    def num_trials(self) -> int:
        """Trials of the whole search: every grid point (rows × grid values) times ``num_samples``."""
        return self.grid_size() * self.num_samples


def fill(override: str, params: dict[str, Any]) -> str:
    """A group's override with ``{key}`` replaced by the trial's value of a searched key, e.g.
    ``data.labeled_keys=runs/select/selection/labeled_keys_{data.num_labeled}.json``."""
    for key, value in params.items():
        override = override.replace("{" + key + "}", str(value))
    return override


def resolve_search(path: str | Path) -> Path:
    """A search name (``demo_loss_weights``), file name or path -> existing path."""
    return resolve_named_file(path, SEARCH_DIR, "search file")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"space.{key}"
    _need(isinstance(spec, dict) and len(spec) == 1, where,
          f"expected one of {{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, {{loguniform: [low, high]}}, "
          f"got {spec!r}")
    kind, arg = next(iter(spec.items()))
    _need(kind in DISTRIBUTIONS, where, f"unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if kind in ("grid", "choice"):
        _need(isinstance(arg, list) and len(arg) >= 1, where, f"{kind} needs a non-empty list, got {arg!r}")
        return Dimension(key, kind, values=list(arg))
    _need(isinstance(arg, list) and len(arg) == 2, where, f"{kind} needs [low, high], got {arg!r}")
    low, high = _number(arg[0], where), _number(arg[1], where)
    _need(low < high, where, f"low must be below high, got [{low}, {high}]")
    _need(kind != "loguniform" or low > 0, where, f"loguniform needs low > 0, got {low}")
    return Dimension(key, kind, low=low, high=high)


def _check_values(base: str, fixed: list[str], dim: Dimension) -> None:
    """Apply every value (grid/choice) or both bounds to the base config: the key exists, the
    value has its type and passes its checks."""
    values = dim.values if dim.kind in ("grid", "choice") else [dim.low, dim.high]
    for v in values:
        try:
            load_config(base, [*fixed, f"{dim.key}={json.dumps(v)}"])
        except ConfigError as e:
            raise ConfigError(f"space.{dim.key}: {e}") from None


def load_search(path: str | Path, extra_overrides: list[str] | None = None) -> SearchSpec:
    """Read and check a search file; ``extra_overrides`` (``key=value``) join its fixed overrides."""
    p = resolve_search(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    try:
        return _parse(p, data, list(extra_overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _parse(p: Path, data: Any, extra: list[str]) -> SearchSpec:
    _need(isinstance(data, dict), "search file", "top level must be a mapping")
    unknown = sorted(set(data) - set(TOP_KEYS))
    _need(not unknown, unknown[0] if unknown else "", f"unknown key (known: {', '.join(TOP_KEYS)})")
    _need("base" in data, "base", "a search names the preset every trial trains")
    base = str(data["base"])
    resolve_preset(base)
    fixed = [str(o) for o in data.get("overrides") or []] + extra
    for o in fixed:
        parse_override(o)
    base_cfg = load_config(base, fixed)
    space = [_dimension(str(k), v) for k, v in (data.get("space") or {}).items()]
    for dim in space:
        _check_values(base, fixed, dim)
    groups: dict[str, dict[str, list[str]]] = {}
    for gname, options in (data.get("groups") or {}).items():
        _need(isinstance(options, dict) and options, f"groups.{gname}", "expected a mapping name -> [overrides]")
        _need(gname not in {d.key for d in space}, f"groups.{gname}", "also a space key")
        groups[str(gname)] = {}
        for label, ovs in options.items():
            _need(isinstance(ovs, list), f"groups.{gname}.{label}", f"expected a list of key=value, got {ovs!r}")
            try:
                example = {d.key: d.values[0] if d.values else d.low for d in space}
                load_config(base, [*fixed, *(fill(str(o), example) for o in ovs)])
            except ConfigError as e:
                raise ConfigError(f"groups.{gname}.{label}: {e}") from None
            groups[str(gname)][str(label)] = [str(o) for o in ovs]
    _need(space or groups, "space", "nothing to search: give a space or groups")
    metric = data.get("metric")
    _need(isinstance(metric, str) and metric, "metric", "name the validation metric to optimise, e.g. seg/miou")
    prefixes = STAGE_METRICS.get(base_cfg.stage, ())
    _need(metric.startswith(prefixes), "metric",
          f"{metric!r} is not reported by the {base_cfg.stage} stage (its metrics start with {', '.join(prefixes)})")
    mode = data.get("mode", "max")
    _need(mode in ("min", "max"), "mode", f"must be min or max, got {mode!r}")
    sched_data = dict(data.get("scheduler") or {"name": "fifo"})
    s_unknown = sorted(set(sched_data) - {"name", "grace_period", "max_t", "reduction_factor"})
    _need(not s_unknown, f"scheduler.{s_unknown[0]}" if s_unknown else "", "unknown key")
    scheduler = Scheduler(name=str(sched_data.get("name", "fifo")),
                          grace_period=int(sched_data.get("grace_period", 1)),
                          max_t=int(sched_data.get("max_t", 0)),
                          reduction_factor=float(sched_data.get("reduction_factor", 2.0)))
    _need(scheduler.name in ("asha", "fifo"), "scheduler.name", f"asha or fifo, got {scheduler.name!r}")
    max_t = scheduler.max_t or base_cfg.train.steps
    _need(1 <= scheduler.grace_period <= max_t, "scheduler.grace_period", f"must be in [1, max_t={max_t}]")
    _need(scheduler.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
    if scheduler.name == "asha":
        every = base_cfg.train.val_every
        _need(every > 0 and every <= scheduler.grace_period, "scheduler.grace_period",
              f"ASHA compares trials at validations: train.val_every ({every}) must be > 0 and <= the grace "
              f"period ({scheduler.grace_period})")
    search_data = dict(data.get("search") or {"name": "grid"})
    q_unknown = sorted(set(search_data) - {"name", "num_samples"})
    _need(not q_unknown, f"search.{q_unknown[0]}" if q_unknown else "", "unknown key")
    search = str(search_data.get("name", "grid"))
    _need(search in ("random", "grid", "optuna"), "search.name", f"random, grid or optuna, got {search!r}")
    num_samples = int(search_data.get("num_samples", 1))
    _need(num_samples >= 1, "search.num_samples", "must be >= 1")
    if search == "grid":
        _need(all(d.kind == "grid" for d in space), "search.name",
              "grid search takes only grid dimensions; use random (or optuna) for choice/uniform/loguniform")
    if search == "optuna":
        _need(not groups and all(d.kind != "grid" for d in space), "search.name",
              "optuna samples every dimension itself: use choice instead of grid, and no groups")
    res_data = dict(data.get("resources") or {})
    r_unknown = sorted(set(res_data) - {"num_workers", "cpus_per_worker", "gpus_per_worker"})
    _need(not r_unknown, f"resources.{r_unknown[0]}" if r_unknown else "", "unknown key")
    resources = Resources(num_workers=int(res_data.get("num_workers", base_cfg.runtime.num_workers)),
                          cpus_per_worker=float(res_data.get("cpus_per_worker", base_cfg.runtime.cpus_per_worker)),
                          gpus_per_worker=float(res_data.get("gpus_per_worker", 0.0)))
    _need(resources.num_workers >= 1, "resources.num_workers", "must be >= 1")
    _need(resources.cpus_per_worker > 0, "resources.cpus_per_worker", "must be > 0")
    _need(resources.gpus_per_worker >= 0, "resources.gpus_per_worker", "must be >= 0")
    max_concurrent = int(data.get("max_concurrent", 1))
    _need(max_concurrent >= 1, "max_concurrent", "must be >= 1")
    plot = dict(data.get("plot") or {})
    _need(set(plot) <= {"x", "series"}, "plot", "keys: x (a searched key or group), series (another)")
    searched = {d.key for d in space} | set(groups)
    for k, v in plot.items():
        _need(v in searched, f"plot.{k}", f"{v!r} is not a searched key or group ({', '.join(sorted(searched))})")
    compare = _compare(data.get("compare"), space, groups)
    spec = SearchSpec(path=str(p), name=str(data.get("name") or p.stem), base=base, overrides=fixed, space=space,
                      groups=groups, metric=metric, mode=mode, scheduler=scheduler, search=search,
                      num_samples=num_samples, resources=resources, max_concurrent=max_concurrent, plot=plot,
                      compare=compare)
    spec.trial_config(example_params(spec))  # one whole trial config, with the resources
    return spec


def _compare(data: Any, space: list[Dimension], groups: dict[str, dict[str, list[str]]]) -> Compare | None:
    """The ``compare`` block checked against the space; without one, seeds are aggregated when
    ``train.seed`` is a grid of two or more values."""
    grids = {d.key: d.values for d in space if d.kind == "grid"}
    if data is None:
        return Compare() if len(grids.get("train.seed", [])) >= 2 else None
    _need(isinstance(data, dict), "compare",
          f"expected a mapping {{seeds: KEY, baseline: {{KEY: VALUE}}}}, got {data!r}")
    unknown = sorted(set(data) - {"seeds", "baseline"})
    _need(not unknown, f"compare.{unknown[0]}" if unknown else "", "unknown key (known: seeds, baseline)")
    seeds = str(data.get("seeds", "train.seed"))
    _need(seeds in grids, "compare.seeds", f"{seeds!r} is not a grid key of the space (seeds are replicates: every "
                                           f"value runs with every other combination)")
    baseline = data.get("baseline") or {}
    _need(isinstance(baseline, dict), "compare.baseline", f"expected a mapping KEY: VALUE, got {baseline!r}")
    for key, value in baseline.items():
        where = f"compare.baseline.{key}"
        _need(key != seeds, where, "the seeds key pairs the rows; it cannot be a baseline value")
        if key in groups:
            _need(str(value) in groups[key], where, f"{value!r} is not one of the group's options "
                                                    f"({', '.join(groups[key])})")
        else:
            _need(key in grids, where, "not a grid key or group of the search (a baseline row must exist in "
                                       "every seed)")
            _need(value in grids[key], where, f"{value!r} is not one of its grid values {grids[key]}")
    return Compare(seeds=seeds, baseline={str(k): (str(v) if k in groups else v) for k, v in baseline.items()})


def example_params(spec: SearchSpec) -> dict[str, Any]:
    """One point of the space (first values, lower bounds, first group options)."""
    params: dict[str, Any] = {}
    for d in spec.space:
        params[d.key] = d.values[0] if d.values else d.low
    for g, options in spec.groups.items():
        params[g] = next(iter(options))
    return params


def grid_points(spec: SearchSpec) -> list[dict[str, Any]]:
    """Every combination of the grid dimensions and groups (for counting and for tests)."""
    axes = [(d.key, d.values) for d in spec.space if d.kind == "grid"] + [(g, list(o)) for g, o in spec.groups.items()]
    return [dict(zip([a for a, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
