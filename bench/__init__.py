"""naiad benchmarks: `python -m bench [--quick] [--only NAME ...]`.

Each benchmark lives in its own module of this package and registers a function
with `@benchmark(NAME, TITLE)`. The function takes a `Context` and returns the
`Table`s of its section; `python -m bench` runs them in `MODULES` order, prints
the tables and writes a markdown report to `bench/results/`.

To add a benchmark: write `bench/NAME.py` with a registered function and add
NAME to `MODULES`. Keep this module light: the benchmarks' child processes
import it too (`python -m bench.bootstrap probe ...`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

# Benchmark modules, in the order they run.
MODULES = ("convert", "bootstrap", "warmread", "coldstart", "push", "dedup", "p2p")


class BenchError(Exception):
    """A benchmark cannot run or failed; the message says why and what to do."""


@dataclasses.dataclass
class Table:
    """One markdown table; `notes` are printed under it as plain lines."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        out = [f"**{self.title}**", "", line(self.headers), rule]
        out += [line(row) for row in self.rows]
        if self.notes:
            out.append("")
            out += self.notes
        return "\n".join(out)


@dataclasses.dataclass
class Context:
    """What every benchmark gets: the mode, the repetitions and where to cache inputs."""

    quick: bool
    reps: int
    cache: Path  # $NAIAD_BENCH_CACHE: inputs kept between runs (reference images, sizes)
    repo: Path  # the naiad checkout
    log: Callable[[str], None]
    report: Path | None = None  # the report being written (None: --no-report); put plots beside it
    workloads: tuple[str, ...] = ()  # --workload: the workloads to run (empty: the benchmark's default)
    networks: tuple[str, ...] = ()  # --networks: registry egress rates, e.g. "unshaped", "100mbit"
    methods: tuple[str, ...] = ()  # --methods: coldstart's methods to run (empty: all)
    p2p_nodes: int | None = None  # --p2p-nodes: nodes of coldstart's naiad-p2p (None: its default)

    def artifact(self, suffix: str) -> Path | None:
        """A file beside the report, e.g. `artifact("coldstart.png")` → results/DATE-NAME-coldstart.png."""
        return self.report.with_name(f"{self.report.stem}-{suffix}") if self.report else None


BenchFn = Callable[[Context], list[Table]]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    fn: BenchFn


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, title: str) -> Callable[[BenchFn], BenchFn]:
    """Register `fn` as benchmark `name` (what `--only` selects); `title` heads its section."""

    def register(fn: BenchFn) -> BenchFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(name, title, fn)
        return fn

    return register


def load_all() -> dict[str, Benchmark]:
    """Import every benchmark module (they register themselves) and return the registry."""
    for module in MODULES:
        importlib.import_module(f"bench.{module}")
    return REGISTRY
