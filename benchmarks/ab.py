#!/usr/bin/env python3
"""A/B of two source trees of diffunet with `bench.py`, one after the other on the same GPU.

    git archive main src benchmarks | tar -x -C .ab/base     # the tree to compare against
    python benchmarks/ab.py --base-src .ab/base/src --cases ldm,3d --kinds train,infer \\
        --compile-mode reduce-overhead --limit 560

`--change-src` (default: this checkout's `src/`) is the tree with the change; `--change-env
NAME=VALUE` sets environment variables for its processes only, so that one tree can be A/B-tested
against itself with a switch (`--base-src src --change-env DIFFUNET_THIN_CONV=0`). For each case and
kind, `bench.py` runs in its own process per tree (`PYTHONPATH` put first, which tree each one
imported is checked and recorded): the base with the reference model, then the change; each
further `--rounds` repeats the pair in the other order, so that a drift of the machine shows
instead of favouring one side. Both trees time the same `--iters` × `--repeats` steps (30 × 5:
about a second per repeat for a short, host-bound step). Each tree runs its own
`benchmarks/bench.py` where it has one next to its `src/` (or, from before the harness left the
package, its `diffunet.benchmark`), else this checkout's. With `compile` among the modes,
every (tree, case, model) is first compiled in `--fill-jobs` parallel processes that fill
Inductor's on-disk caches (as `bench.py --compile-ahead` does), so the measuring processes
load their graphs in seconds.

Prints a table (throughput per tree, the change's gain, and both against the reference
measured in the same call) and writes JSON with every `bench.py` result (`--out`, default
`$OUT/ab.json` when `OUT` is set).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.fill import run_fill

BENCH = Path(__file__).resolve().parent / "bench.py"
CHECKOUT_SRC = Path(__file__).resolve().parents[1] / "src"


def source_tree(text: str) -> Path:
    """A folder that holds the `diffunet` package (argparse type)."""
    path = Path(text).resolve()
    if not (path / "diffunet" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"{text}: no diffunet/__init__.py there; pass the src/ folder of a diffunet tree, "
            "e.g. after `git archive REV src | tar -x -C .ab/base`: .ab/base/src"
        )
    return path


def tree_env(src: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a Python process import diffunet from `src`, with `extra`
    variables set."""
    return dict(
        os.environ,
        **(extra or {}),
        PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    )


def env_setting(text: str) -> tuple[str, str]:
    """`NAME=VALUE` (argparse type)."""
    name, equals, value = text.partition("=")
    if not (equals and name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=VALUE, e.g. DIFFUNET_THIN_CONV=0"
        )
    return name, value


def imported_from(src: Path) -> str:
    """The `diffunet` package file a process with `tree_env(src)` imports; raises if it is not
    the one under `src` (an installed copy shadowing it)."""
    # Where the import resolves, found without running the package (no torch import).
    code = "import importlib.util; print(importlib.util.find_spec('diffunet').origin)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=tree_env(src),
        capture_output=True,
        text=True,
    )
    found = done.stdout.strip()
    if done.returncode != 0 or not Path(found).resolve().is_relative_to(src):
        raise RuntimeError(
            f"a process with PYTHONPATH={src} imports diffunet from "
            f"{found or done.stderr.strip()[-200:]}, not from that tree"
        )
    return found


#: How a tree from before the harness left the package ran it.
_PACKAGED_BENCH = "import sys; from diffunet.benchmark import main; sys.exit(main(sys.argv[1:]))"


def bench_command(src: Path) -> list[str]:
    """The command that runs `bench.py` for the tree `src`: the tree's own harness where it
    has one (`benchmarks/bench.py` next to its `src/`, or, from before the harness left the
    package, `diffunet.benchmark`), else this checkout's `bench.py`."""
    own = src.parent / "benchmarks" / "bench.py"
    if own.is_file():
        return [sys.executable, str(own)]
    if (src / "diffunet" / "benchmark.py").is_file():
        return [sys.executable, "-c", _PACKAGED_BENCH]
    return [sys.executable, str(BENCH)]


def bench_argv(args: argparse.Namespace, case: str, kind: str, models: str) -> list[str]:
    """`bench.py` options for one measurement (without `--out` and `--deadline`)."""
    argv = [
        "--cases",
        case,
        "--kinds",
        kind,
        "--models",
        models,
        "--modes",
        args.modes,
        "--checkpoint-modes",
        "none",
        "--compile-mode",
        args.compile_mode,
    ]
    return argv + ["--quick"] * args.quick + (["--device", args.device] if args.device else [])


@functools.cache
def _sizes_repeats(script: Path) -> bool:
    """Whether the harness `script` can time more iterations than asked (`--min-repeat-s`)."""
    return script.is_file() and "--min-repeat-s" in script.read_text()


def timing_argv(args: argparse.Namespace, src: Path) -> list[str]:
    """`bench.py`'s timing options for a measurement of the tree `src`: `--iters` and
    `--repeats` as given, the same for both trees, and exactly that many iterations where the
    tree's harness could time more (`--min-repeat-s 0`)."""
    argv = ["--iters", str(args.iters), "--repeats", str(args.repeats)]
    if _sizes_repeats(Path(bench_command(src)[1])):
        argv += ["--min-repeat-s", "0"]
    return argv


def fill_caches(
    args: argparse.Namespace,
    trees: dict[str, Path],
    envs: dict[str, dict[str, str]],
    start: float,
) -> list[dict]:
    """Compile every (tree, case, model, kind) once in parallel processes; their seconds and
    errors. A process still compiling `--limit` seconds after `start` is stopped."""
    jobs = [
        (name, case, model, kind)
        for case in args.cases.split(",")
        for name in trees
        for model in (("ours", "ref") if name == "base" and args.ref else ("ours",))
        for kind in args.kinds.split(",")
    ]

    def fill(job: tuple[str, str, str, str]) -> dict:
        name, case, model, kind = job
        argv = bench_argv(args, case, kind, model)
        argv += ["--warmup", "1", "--iters", "1", "--repeats", "1", "--fill-caches-only"]
        return run_fill(
            [*bench_command(trees[name]), *argv],
            dict(tree_env(trees[name], envs[name]), OUT=""),
            max(args.limit - (time.perf_counter() - start), 1.0),
            {"tree": name, "case": case, "model": model, "kind": kind},
            "stopped at the limit",
        )

    with ThreadPoolExecutor(args.fill_jobs) as pool:
        return list(pool.map(fill, jobs))


def measure(
    args: argparse.Namespace,
    src: Path,
    case: str,
    kind: str,
    models: str,
    seconds_left: float,
    env: dict[str, str] | None = None,
) -> dict:
    """One `bench.py` process on the tree `src` (with `env` set); its JSON (or the error it
    ended with)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = bench_argv(args, case, kind, models) + timing_argv(args, src)
        argv += ["--deadline", str(max(1, int(seconds_left))), "--out", str(out)]
        try:
            done = subprocess.run(
                [*bench_command(src), *argv],
                capture_output=True,
                text=True,
                env=tree_env(src, env),
                timeout=seconds_left + 60,
            )
            error = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        except subprocess.TimeoutExpired:
            error = f"bench.py still ran {seconds_left + 60:.0f} s after it started; killed"
        if out.is_file():  # bench.py rewrites it after every measurement
            return json.loads(out.read_text())
    return {"errors": [{"where": "bench.py", "error": error}], "records": []}


def recorded(
    result: dict, model: str, mode: str, kind: str, key: str = "throughput"
) -> float | None:
    """What `bench.py` recorded under `key` ("throughput", "peak_mem_gib") for one model, mode
    and kind (None if not measured)."""
    for record in result.get("records", []):
        if (record.get("model"), record.get("mode"), record.get("kind")) == (model, mode, kind):
            return record.get(key)
    return None


def _values(
    runs: list[dict], tree: str, model: str, mode: str, key: str = "throughput"
) -> list[float]:
    found = (recorded(r["result"], model, mode, r["kind"], key) for r in runs if r["tree"] == tree)
    return [v for v in found if v is not None]


def summarize(runs: list[dict], modes: list[str]) -> list[dict]:
    """Per case, kind and mode: each tree's throughput in every round, the change's gain over
    the base, each tree against the reference, and each one's peak memory (medians over the
    rounds)."""
    rows = []
    for case, kind in dict.fromkeys((r["case"], r["kind"]) for r in runs):
        mine = [r for r in runs if (r["case"], r["kind"]) == (case, kind)]
        for mode in modes:
            base, change = (
                _values(mine, "base", "ours", mode),
                _values(mine, "change", "ours", mode),
            )
            ref = _values(mine, "base", "ref", mode)
            if not (base or change):
                continue
            row = {
                "case": case,
                "kind": kind,
                "mode": mode,
                "base": base,
                "change": change,
                "ref": ref,
            }
            if base and change:
                row["gain"] = statistics.median(change) / statistics.median(base) - 1
            for tree, measured in (("base", base), ("change", change)):
                if ref and measured:
                    row[f"{tree}_vs_ref"] = statistics.median(measured) / statistics.median(ref)
            peaks = {
                "base": _values(mine, "base", "ours", mode, "peak_mem_gib"),
                "change": _values(mine, "change", "ours", mode, "peak_mem_gib"),
                "ref": _values(mine, "base", "ref", mode, "peak_mem_gib"),
            }
            row["peak_gib"] = {name: statistics.median(v) for name, v in peaks.items() if v}
            rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    """The summary as a fixed-width table."""

    def cell(values: list[float]) -> str:
        return "/".join(f"{v:.1f}" for v in values) or "-"

    head = (
        f"{'case':<13}{'kind':<6}{'mode':<8}{'base':>16}{'change':>16}{'gain':>8}"
        f"{'ref':>12}{'base÷ref':>10}{'change÷ref':>12}  peak GiB base/change/ref"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gain = f"{100 * r['gain']:+.1f}%" if "gain" in r else "-"
        ratios = [f"{r[k]:.2f}×" if k in r else "-" for k in ("base_vs_ref", "change_vs_ref")]
        peak = r.get("peak_gib", {})
        peaks = "/".join(
            f"{peak[name]:.2f}" if name in peak else "-" for name in ("base", "change", "ref")
        )
        lines.append(
            f"{r['case']:<13}{r['kind']:<6}{r['mode']:<8}{cell(r['base']):>16}"
            f"{cell(r['change']):>16}{gain:>8}{cell(r['ref']):>12}{ratios[0]:>10}"
            f"{ratios[1]:>12}  {peaks}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options (see `--help`), validated."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--base-src",
        type=source_tree,
        required=True,
        help="src/ folder of the tree to compare against",
    )
    parser.add_argument(
        "--change-src",
        type=source_tree,
        default=CHECKOUT_SRC,
        help="src/ folder of the tree with the change",
    )
    parser.add_argument(
        "--change-env",
        type=env_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the change's processes (repeatable)",
    )
    parser.add_argument("--cases", default="ldm,3d", help="bench.py cases, comma-separated")
    parser.add_argument("--kinds", default="train,infer", help="train, infer or both")
    parser.add_argument("--modes", default="compile", help="eager, compile or both")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="bench.py --compile-mode")
    parser.add_argument(
        "--no-ref",
        dest="ref",
        action="store_false",
        default=argparse.SUPPRESS,
        help="measure ours only (no diffusers / MONAI; by default both are measured)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measurements per tree and case/kind, in alternating order",
    )
    parser.add_argument(
        "--iters",
        type=int,
        help="timed iterations per repeat, both trees alike (default 30, --quick 2)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed repeats per measurement, median taken (default 5, --quick 1)",
    )
    parser.add_argument(
        "--fill-jobs",
        type=int,
        default=6,
        help="parallel cache-filling processes (0: compile while measuring)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=560,
        help="seconds for the whole run; later measurements are skipped",
    )
    parser.add_argument("--quick", action="store_true", help="bench.py --quick (CPU smoke test)")
    parser.add_argument("--device", help="bench.py --device")
    parser.add_argument("--out", help="JSON path (default: $OUT/ab.json when OUT is set)")
    args = parser.parse_args(argv)
    args.ref = getattr(args, "ref", True)  # SUPPRESS keeps "(default: True)" out of --no-ref's help
    if args.iters is None:
        args.iters = 2 if args.quick else 30
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    for option in ("rounds", "iters", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    for option, allowed in (("kinds", {"train", "infer"}), ("modes", {"eager", "compile"})):
        bad = set(getattr(args, option).split(",")) - allowed
        if bad:
            parser.error(
                f"--{option}: unknown {', '.join(sorted(bad))}; choose from "
                f"{', '.join(sorted(allowed))}"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the A/B; exit code 1 if any measurement recorded an error."""
    args = parse_args(argv)
    start = time.perf_counter()
    trees = {"base": args.base_src, "change": args.change_src}
    envs = {"base": {}, "change": dict(args.change_env)}
    data: dict = {
        "meta": {
            "argv": sys.argv[1:] if argv is None else argv,
            "trees": {
                name: {
                    "src": str(src),
                    "imports": imported_from(src),
                    "bench": bench_command(src)[1:],
                    "env": envs[name],
                }
                for name, src in trees.items()
            },
        },
        "runs": [],
    }
    if "compile" in args.modes.split(",") and args.fill_jobs > 0:
        data["meta"]["fills"] = fill_caches(args, trees, envs, start)
        print(f"caches filled in {time.perf_counter() - start:.0f} s", flush=True)
        for fill in data["meta"]["fills"]:
            if "error" in fill:
                print(
                    f"  filling {fill['tree']} {fill['case']} {fill['model']} {fill['kind']} "
                    f"failed: {fill['error']}",
                    flush=True,
                )
    order = [("base", "ours,ref" if args.ref else "ours"), ("change", "ours")]
    for round_index in range(args.rounds):
        for case in args.cases.split(","):
            for kind in args.kinds.split(","):
                for name, models in order if round_index % 2 == 0 else order[::-1]:
                    left = args.limit - (time.perf_counter() - start)
                    if left < 30:
                        print(f"skipped {name} {case} {kind}: {left:.0f} s left", flush=True)
                        continue
                    result = measure(args, trees[name], case, kind, models, left - 10, envs[name])
                    data["runs"].append(
                        {
                            "tree": name,
                            "case": case,
                            "kind": kind,
                            "round": round_index,
                            "result": result,
                        }
                    )
                    rates = [
                        f"{r['model']} {r['throughput']:.1f}"
                        + (
                            f" (host probe {r['host_probe_ms']:.1f} ms)"
                            if "host_probe_ms" in r
                            else ""
                        )
                        for r in result.get("records", [])
                        if r.get("throughput")
                    ]
                    print(
                        f"{name:<7}{case:<13}{kind:<6}{', '.join(rates) or result['errors']}",
                        flush=True,
                    )
    data["summary"] = summarize(data["runs"], args.modes.split(","))
    print(format_summary(data["summary"]))
    out = args.out or (os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "ab.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")
    errors = [r for r in data["runs"] if r["result"].get("errors")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
