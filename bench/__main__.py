"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print tables, write a report.

The report goes to `bench/results/<YYYY-MM-DD>-<name>.md` (name: `--name`, else
`quick` or `full`, plus the `--only` selection); an existing report is never
overwritten: the name then ends in -2, -3, ... Inputs that are slow to make
(the reference images) are kept in `$NAIAD_BENCH_CACHE` (default
`~/.cache/naiad-bench`). Exit status 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

from bench import BenchError, Context, Table, load_all
from bench.harness import machine_facts

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def main(argv: list[str] | None = None) -> int:
    registry = load_all()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small inputs and one repetition (a smoke test, well under a minute)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(registry),
                        help=f"run only these benchmarks ({', '.join(registry)})")
    parser.add_argument("--reps", type=int,
                        help="repetitions where a benchmark repeats (default: 3, quick: 1)")
    parser.add_argument("--workload", nargs="+", default=[], metavar="NAME",
                        help="coldstart: these workloads only (torchapp, nodeapp, djangoapp; default: all, "
                             "quick: quickapp)")
    parser.add_argument("--networks", nargs="+", default=[], metavar="RATE",
                        help="coldstart: these registry egress rates only (unshaped, 100mbit, 1gbit, ...)")
    parser.add_argument("--methods", nargs="+", default=[], metavar="METHOD",
                        help="coldstart: these methods only (oci, naiad-lazy, naiad-p2p, floor, ...; "
                             "default: all)")
    parser.add_argument("--p2p-nodes", type=int, metavar="N",
                        help="coldstart: nodes starting the image at once in naiad-p2p (default 4, quick 2)")
    parser.add_argument("--name", help="report name (default: quick or full)")
    parser.add_argument("--no-report", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)

    selected = [b for b in registry.values() if not args.only or b.name in args.only]
    cache = Path(os.environ.get("NAIAD_BENCH_CACHE") or Path.home() / ".cache" / "naiad-bench")
    cache.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    mode = "quick" if args.quick else "full"
    name = args.name or (mode if not args.only else f"{mode}-{'-'.join(args.only)}")
    out = None if args.no_report else _new_report(BENCH_DIR / "results", f"{started:%Y-%m-%d}-{name}")
    ctx = Context(quick=args.quick, reps=args.reps or (1 if args.quick else 3), cache=cache, repo=REPO,
                  log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True), report=out,
                  workloads=tuple(args.workload), networks=tuple(args.networks),
                  methods=tuple(args.methods), p2p_nodes=args.p2p_nodes)

    # naiad as installed from a wheel starts from bytecode; an editable checkout in an environment
    # that writes none (PYTHONDONTWRITEBYTECODE) would compile its modules in every naiad process
    # measured (0.05 s of each mount's start).
    compileall.compile_dir(REPO / "src", quiet=1)

    sections: list[str] = []
    failed: list[str] = []
    for bench in selected:
        ctx.log(f"running {bench.name}")
        t0 = time.perf_counter()
        try:
            tables: list[Table] = bench.fn(ctx)
            body = "\n\n".join(t.markdown() for t in tables)
        except BenchError as e:
            failed.append(bench.name)
            body = f"**FAILED**: {e}"
        except Exception:
            failed.append(bench.name)
            body = "**FAILED** (unexpected error):\n\n```\n" + traceback.format_exc() + "```"
        section = f"## {bench.name}: {bench.title}\n\n{body}\n\n_({time.perf_counter() - t0:.0f} s)_"
        print("\n" + section + "\n", flush=True)
        sections.append(section)

    machine = Table("Machine", ["fact", "value"], [[k, v] for k, v in machine_facts(REPO)])
    cmdline = sys.argv[1:] if argv is None else argv
    report = "\n\n".join([
        f"# naiad benchmarks, {started:%Y-%m-%d %H:%M} ({mode})",
        f"Command: `python -m bench{''.join(' ' + a for a in cmdline)}`",
        machine.markdown(),
        *sections,
    ]) + "\n"
    print(machine.markdown())
    if out:
        out.write_text(report)
        print(f"\nreport: {out.relative_to(REPO)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _new_report(results: Path, stem: str) -> Path:
    """results/STEM.md, or STEM-2.md, STEM-3.md... if taken (plots take the report's stem)."""
    results.mkdir(exist_ok=True)
    out, n = results / f"{stem}.md", 1
    while out.exists():
        n += 1
        out = results / f"{stem}-{n}.md"
    return out


if __name__ == "__main__":
    sys.exit(main())
