"""Paired 95% intervals of the open issues' comparisons (BENCHMARKS.md, "how sure the open comparisons are").

The per-seed test mIoU figures are typed in from the tables of BENCHMARKS.md named beside each; the run
directories behind them are on machines that are gone. Run: ``python docs/bench/intervals.py``.
"""

from scipy.stats import t

from sdeseg.stats import paired_difference

SEEDS = range(6)
# issue 19: the protocol's rows (seeds 0-2) and the six-seed replication (seeds 3-5), test mIoU
DEPTH = dict(zip(SEEDS, [30.12, 31.55, 29.86, 29.88, 32.44, 34.32]))
RANDOM = dict(zip(SEEDS, [28.72, 28.39, 29.02, 28.06, 30.13, 32.03]))
ENTROPY = dict(zip(SEEDS, [33.16, 29.97, 31.24, 30.08, 34.21, 30.09]))
DEPTH_LONG = dict(zip(SEEDS, [29.45, 32.02, 29.60, 29.45, 31.54, 31.36]))  # second amendment, [300,600]
# fourth amendment (seeds 6-11, an Intel VM with its own re-made teacher), the protocol's commands
NEW_SEEDS = range(6, 12)
DEPTH_NEW = dict(zip(NEW_SEEDS, [31.82, 33.47, 32.37, 28.78, 32.34, 33.00]))
ENTROPY_NEW = dict(zip(NEW_SEEDS, [31.64, 33.29, 29.58, 32.08, 35.43, 35.32]))
RANDOM_NEW = dict(zip(NEW_SEEDS, [31.95, 28.35, 27.99, 29.54, 30.67, 32.14]))  # 8 and 11: resumed the next session
# fifth amendment: the protocol's seeds 0-2 again, on the Intel VM of the fourth amendment (its teacher)
INTEL = {"depth": dict(zip(range(3), [31.90, 29.86, 32.06])), "entropy": dict(zip(range(3), [32.76, 28.62, 29.94])),
         "random": dict(zip(range(3), [30.17, 28.04, 28.86]))}
# issue 20 at 3200 steps (fifth and sixth amendments), seeds 0 and 1
SSDA = {"(1)": [37.61, 37.40], "(2)": [49.63, 47.37], "(3)": [48.46, 47.03], "(4)": [43.92, 44.97],
        "(5)": [45.58, 43.82]}
SSDA_SEED2 = {"(2)": 50.40, "(3)": 49.00, "(5)": 44.45}  # eleventh amendment, this VM
SSDA_800 = {"(2)": [33.30, 31.75], "(3)": [32.48, 31.99], "(5)": [31.45, 32.16]}  # fourth amendment
# the component study through `sdeseg tune component_study` (issue 21), 3200 steps, seeds 0 and 1
COMPONENTS = {"supervised": [37.79, 37.20], "ClassMix": [39.33, 41.05], "DepthMix": [37.10, 39.02],
              "multi-task": [36.76, 37.62], "full": [37.49, 42.23]}
# rebalanced DepthMix against supervised at 4800 steps ("4800 steps: rebalanced DepthMix +4.6"), one decimal
REBALANCED_4800 = {"supervised": [38.2, 37.4], "DepthMix rebalanced": [42.4, 42.4]}


def show(name, a, b, seeds=None):
    if seeds is not None:
        a, b = {k: a[k] for k in seeds}, {k: b[k] for k in seeds}
    iv, _ = paired_difference(a, b)
    print(f"{name}: {iv.format()} sd {iv.sd:.2f} n {iv.n} -> {iv.resolves()}; against +1.0: {iv.resolves(1.0)}")
    return iv


def seeds_needed(iv, what):
    """How many seeds a 95% interval of half-width 1.0 and 0.5 needs at ``iv``'s per-seed sd."""
    for half in (1.0, 0.5):
        n = next(n for n in range(2, 10000) if t.ppf(0.975, n - 1) * iv.sd / n**0.5 < half)
        print(f"  seeds for a half-width of {half} at {what}: {n}")


def main():
    print("issue 19, the protocol's seeds 0-2")
    show("depth - random", DEPTH, RANDOM, [0, 1, 2])
    show("depth - entropy", DEPTH, ENTROPY, [0, 1, 2])
    print("issue 19, six seeds")
    show("depth - random", DEPTH, RANDOM)
    tie = show("depth - entropy", DEPTH, ENTROPY)
    show("entropy - random", ENTROPY, RANDOM)
    show("depth [300,600] - entropy", DEPTH_LONG, ENTROPY)
    show("depth [300,600] - depth", DEPTH_LONG, DEPTH)
    print("issue 19, fourth amendment: seeds 6-11 alone, then pooled with 0-5 (12 seeds)")
    show("depth - entropy", DEPTH_NEW, ENTROPY_NEW)
    pooled = show("depth - entropy", DEPTH | DEPTH_NEW, ENTROPY | ENTROPY_NEW)
    show("depth - random (6-11)", DEPTH_NEW, RANDOM_NEW)
    show("entropy - random (6-11)", ENTROPY_NEW, RANDOM_NEW)
    show("depth - random, pooled (12 seeds)", DEPTH | DEPTH_NEW, RANDOM | RANDOM_NEW)
    show("entropy - random, pooled (12 seeds)", ENTROPY | ENTROPY_NEW, RANDOM | RANDOM_NEW)
    print("issue 19, fifth amendment: seeds 0-2 on the Intel VM; then each method there minus on the AMD VMs")
    show("depth - random", INTEL["depth"], INTEL["random"])
    show("depth - entropy", INTEL["depth"], INTEL["entropy"])
    show("entropy - random", INTEL["entropy"], INTEL["random"])
    for name, amd in (("depth", DEPTH), ("entropy", ENTROPY), ("random", RANDOM)):
        show(f"{name}: Intel - AMD", INTEL[name], amd, [0, 1, 2])
    seeds_needed(pooled, "the pooled sd")
    seeds_needed(tie, "this sd")
    print("issue 20, 3200 steps, three seeds (seed 2: the eleventh amendment)")
    three = {k: dict(enumerate([*SSDA[k], SSDA_SEED2[k]])) for k in SSDA_SEED2}
    show("(5) - (2)", three["(5)"], three["(2)"])
    show("(5) - (3)", three["(5)"], three["(3)"])
    for title, rows, pairs in (
        ("issue 20, 3200 steps", SSDA, [("(5)", "(2)"), ("(5)", "(3)"), ("(3)", "(2)"), ("(5)", "(4)"),
                                        ("(4)", "(3)"), ("(2)", "(1)"), ("(5)", "(1)")]),
        ("issue 20, 800 steps", SSDA_800, [("(5)", "(2)"), ("(5)", "(3)")]),
        ("component study, 3200 steps", COMPONENTS, [(r, "supervised") for r in COMPONENTS if r != "supervised"]
         + [("full", "DepthMix")]),
        ("rebalanced DepthMix, 4800 steps", REBALANCED_4800, [("DepthMix rebalanced", "supervised")]),
    ):
        print(title)
        by_seed = {k: dict(enumerate(v)) for k, v in rows.items()}
        for a, b in pairs:
            show(f"{a} - {b}", by_seed[a], by_seed[b])


if __name__ == "__main__":
    main()
