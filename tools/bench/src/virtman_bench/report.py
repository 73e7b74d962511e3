"""``virtman bench report``: plots and a Markdown page from scale and simulation results.

Reads the JSON documents of ``virtman bench scale`` (kind ``testbed``) and ``virtman bench
simulate`` (kind ``simulation``), in the format of :mod:`virtman_bench.results`, and writes

* one PNG figure (900 px wide) per scenario, named after its main document's file
  (``scale-debian.json`` -> ``scale-debian.png``). A scenario is one setting: a testbed
  document with the simulations calibrated against it (``settings.calibrated_against``),
  or documents of one kind whose settings differ only in the modes and attach delays
  they ran. Documents of different settings are never drawn on one axis. The figure
  stacks up to three panels against the host count:

  1. time until all VMs booted, one line per mode, with the time of one VM booting from
     a local copy (dashed), the target for virtman mode and the simulator's floor;
  2. bytes the origin sent, with the working set times the number of roots (hosts the
     origin feeds directly) as a reference;
  3. the most bytes any one host sent;

* one Markdown page that names every input (kind, exact command line, machine, settings),
  tabulates every mode and embeds the figures with links relative to the page.

Runs with missing or ``null`` values (a mode that failed) are left out of the plots, and
the page says which points were left out and why. Several variants of one mode (the
paper's mode with different attach delays, key ``attach_delay``) are separate lines; a
legend label names the mode and what tells the line from the scenario's other lines of
that mode (measured or simulated, the options its command line differs by).
Plots use matplotlib's Agg canvas directly, so no display and no pyplot state is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from virtman.delivery import MODE_NAMES as MODES
from virtman.errors import ConfigError, VirtmanError
from virtman.limits import TREE_FANOUT, MiB
from virtman.sizes import binary_unit, format_rate

if TYPE_CHECKING:  # matplotlib loads only when a report is drawn, not with the CLI
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_OUT_DIR = "docs/figures"
DEFAULT_MARKDOWN = "docs/scaling.md"
DEFAULT_TITLE = "Scaling: booting many VMs from one base image"

#: File name prefix and heading of each result kind.
KIND_PREFIX = {"testbed": "scale", "simulation": "sim"}
KIND_NAME = {"testbed": "Testbed", "simulation": "Simulation"}

#: A figure of one panel: 9 x 6 inches at 100 dpi, 900 x 600 pixels; each further
#: panel adds 3.4 inches (the title and the legend take the rest).
FIG_SIZE = (9.0, 6.0)
DPI = 100
PANEL_INCHES = 3.4
PANEL_HEADER_INCHES = FIG_SIZE[1] - PANEL_INCHES

#: Colours and markers per mode; variants of one mode (attach delays) take the next ones.
_MODE_STYLE: dict[str, tuple[list[str], list[str]]] = {
    "star": (["#d62728", "#ff9896"], ["s", "s"]),
    "copy": (["#ff7f0e", "#bcbd22"], ["^", "v"]),
    "paper": (["#1f77b4", "#9467bd", "#17becf", "#aec7e8"], ["o", "D", "v", "<"]),
    "virtman": (["#2ca02c", "#98df8a"], ["P", "X"]),
}
_OTHER_STYLE = (["#8c564b", "#e377c2", "#7f7f7f"], ["h", "p", "8"])

MISSING = "—"
#: The issue's target for virtman mode: all booted within this factor of one VM alone.
TARGET_RATIO = 1.3

Doc = dict[str, Any]
Run = dict[str, Any]


# --- input ---------------------------------------------------------------------------------


def load(paths: Iterable[str]) -> list[Doc]:
    """Read result documents; each gets a ``source`` key (the path) if it has none."""
    docs: list[Doc] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as err:
            raise VirtmanError(f"cannot read {path}: {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not JSON: {err}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
            raise ConfigError(f"{path} is not a benchmark result (no list of runs)")
        doc.setdefault("source", path)
        docs.append(doc)
    return docs


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(run: Run, key: str) -> float | None:
    """The run's value for ``key`` if it is a finite number, else None."""
    value = run.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _hosts(run: Run) -> int | None:
    value = _number(run, "hosts")
    return int(value) if value is not None and value >= 1 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def _plain(value: float) -> str:
    """A number without trailing zeros: 10 -> "10", 0.5 -> "0.5"."""
    return f"{value:g}"


# --- scenarios and their series --------------------------------------------------------------
#
# A scenario is one setting measured or modelled: one testbed run, with the simulations
# calibrated against it, or simulations whose settings differ only in which modes and
# attach delays they ran. Each scenario gets its own figure, so lines measured under
# different links, traces or dilations are never drawn on one axis.

#: Settings that only choose which lines a document draws, not the setting it measures.
_LINE_KEYS = frozenset({"modes", "hosts", "attach_delays", "attach_delay_seconds",
                        "attach_delay"})


@dataclass
class Series:
    label: str  # in the figure's legend: the mode and what tells it from the other lines
    name: str  # in the document's own tables: the mode (and attach delay) only
    mode: str
    color: str
    marker: str
    doc_number: int
    runs: list[Run] = field(default_factory=list)
    linestyle: str = "-"

    def points(self, key: str) -> list[tuple[int, float]]:
        """(hosts, value) of the runs that have both, by host count (median of repeats)."""
        by_hosts: dict[int, list[float]] = {}
        for run in self.runs:
            hosts, value = _hosts(run), _number(run, key)
            if hosts is not None and value is not None:
                by_hosts.setdefault(hosts, []).append(value)
        return [(h, _median(v)) for h, v in sorted(by_hosts.items())]

    def missing(self, key: str) -> list[int]:
        """Host counts with runs but no value for ``key`` (a failed or unmeasured point)."""
        have = {h for h, _ in self.points(key)}
        return sorted({h for r in self.runs if (h := _hosts(r)) is not None} - have)


@dataclass
class Scenario:
    number: int
    slug: str  # the figure's file name without ".png"
    docs: list[tuple[int, Doc]]
    series: list[Series] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return _unique(_kind(d) for _, d in self.docs)

    @property
    def measured(self) -> list[Doc]:
        """The documents that define the setting: all but the calibrations joined to it."""
        own = [d for _, d in self.docs if not _calibrated_against(d)]
        return own or [d for _, d in self.docs]

    def name(self) -> str:
        """``scale-debian: testbed and its calibrated simulation``."""
        kinds = self.kinds
        if kinds == ["testbed", "simulation"]:
            what = "testbed and its calibrated simulation"
        else:
            what = " and ".join(KIND_NAME.get(k, k).lower() for k in kinds)
        return f"{self.slug}: {what}"


def _kind(doc: Doc) -> str:
    return str(doc.get("kind") or "unknown")


def _calibrated_against(doc: Doc) -> str | None:
    target = _dict(doc.get("settings")).get("calibrated_against")
    return os.path.basename(str(target)) if target else None


def _setting_key(doc: Doc) -> str:
    settings = {k: v for k, v in _dict(doc.get("settings")).items() if k not in _LINE_KEYS}
    return _kind(doc) + json.dumps(settings, sort_keys=True, default=str)


def _scenarios(docs: Sequence[Doc]) -> list[Scenario]:
    """Documents grouped into scenarios, numbered in the order of their first document."""
    groups: dict[str, list[tuple[int, Doc]]] = {}
    by_source: dict[str, str] = {}
    calibrations: list[tuple[int, Doc]] = []
    for number, doc in enumerate(docs, start=1):
        if _calibrated_against(doc):
            calibrations.append((number, doc))
            continue
        key = _setting_key(doc)
        groups.setdefault(key, []).append((number, doc))
        if doc.get("source") and _kind(doc) == "testbed":
            by_source.setdefault(os.path.basename(str(doc["source"])), key)
    for number, doc in calibrations:
        target = by_source.get(_calibrated_against(doc) or "")
        groups.setdefault(target or _setting_key(doc), []).append((number, doc))
    ordered = sorted(groups.values(), key=lambda g: min(n for n, _ in g))
    scenarios: list[Scenario] = []
    slugs: set[str] = set()
    for i, group in enumerate(ordered, start=1):
        group.sort(key=lambda nd: nd[0])
        main = next((d for _, d in group if not _calibrated_against(d)), group[0][1])
        source = str(main.get("source") or "")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.splitext(os.path.basename(source))[0])
        slug = stem or _prefix(_kind(main))
        if slug in slugs:
            slug = f"{slug}-{i}"
        slugs.add(slug)
        scenario = Scenario(i, slug, group)
        scenario.series = _series(scenario)
        scenarios.append(scenario)
    return scenarios


def _mode_order(mode: str) -> tuple[int, str]:
    return (MODES.index(mode) if mode in MODES else len(MODES), mode)


def _variant_key(run: Run) -> tuple[str, float | None]:
    mode = run.get("mode")
    # The testbed writes ``attach_delay``, the simulator ``attach_delay_seconds``.
    attach = _number(run, "attach_delay")
    if attach is None:
        attach = _number(run, "attach_delay_seconds")
    return (mode if isinstance(mode, str) and mode else "unknown", attach)


def _variant_label(mode: str, attach: float | None) -> str:
    return mode if attach is None else f"{mode} ({_plain(attach)} s attach)"


#: Options that choose the lines or the output file, not the setting.
_LINE_OPTIONS = frozenset({"--json", "--modes", "--hosts", "--attach-delays"})


def _options(doc: Doc) -> list[str]:
    """The command line's options that set the scenario, as ``--name value`` items."""
    command = doc.get("command")
    try:
        words = (shlex.split(command) if isinstance(command, str)
                 else [str(c) for c in command] if isinstance(command, list) else [])
    except ValueError:
        words = str(command).split()
    items: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        takes_value = (word.startswith("--") and "=" not in word and i + 1 < len(words)
                       and not words[i + 1].startswith("--"))
        item = f"{word} {words[i + 1]}" if takes_value else word
        if item.split(maxsplit=1)[0] not in _LINE_OPTIONS:
            items.append(item)
        i += 2 if takes_value else 1
    return items


def _what_differs(number: int, docs: Sequence[tuple[int, Doc]]) -> str:
    """What sets document ``number``'s command apart from the others of its scenario."""
    options = {n: _options(d) for n, d in docs}
    others = [o for n, opts in options.items() if n != number for o in opts]
    own = [o for o in options[number] if o not in others]
    if own:
        return " ".join(own)
    missing = _unique(o for n, opts in options.items() if n != number for o in opts
                      if o not in options[number])
    if missing:
        return "without " + " ".join(missing)
    source = dict(docs)[number].get("source")
    return os.path.basename(str(source)) if source else f"document {number}"


def _series(scenario: Scenario) -> list[Series]:
    """The lines of a scenario's figure: by mode, attach delay, then measured before
    simulated. A line's label names its mode and, where the scenario has several lines
    of that mode, what tells them apart (measured or simulated, the command's options)."""
    mixed = len(scenario.kinds) > 1
    groups: dict[tuple[str, float | None, int], list[Run]] = {}
    for number, doc in scenario.docs:
        for run in doc["runs"]:
            if isinstance(run, dict):
                mode, attach = _variant_key(run)
                groups.setdefault((mode, attach, number), []).append(run)

    kind_rank = {"testbed": 0, "simulation": 1}
    docs = dict(scenario.docs)

    def order(key: tuple[str, float | None, int]) -> tuple[tuple[int, str], float, int, int]:
        # Longest attach delay first: "paper (10 s attach)" before "paper (0 s attach)".
        mode, attach, number = key
        return (_mode_order(mode), -attach if attach is not None else -math.inf,
                kind_rank.get(_kind(docs[number]), 2), number)

    keys = sorted(groups, key=order)
    names = [_variant_label(mode, attach) for mode, attach, _ in keys]
    colour_of: dict[str, int] = {}
    used: dict[str, int] = {}
    out: list[Series] = []
    for (mode, attach, number), name in zip(keys, names, strict=True):
        colors, markers = _MODE_STYLE.get(mode, _OTHER_STYLE)
        if name not in colour_of:
            colour_of[name] = used.get(mode, 0)
            used[mode] = colour_of[name] + 1
        i = colour_of[name]
        doc = docs[number]
        simulated = mixed and _kind(doc) == "simulation"
        label = f"{name}, {'simulated' if simulated else 'measured'}" if mixed else name
        same = [n for (m, a, n), other in zip(keys, names, strict=True)
                if other == name and _kind(docs[n]) == _kind(doc)]
        if len(same) > 1:
            label += f" ({_what_differs(number, [(n, docs[n]) for n in same])})"
        out.append(Series(label, name, mode, colors[i % len(colors)], markers[i % len(markers)],
                          number, groups[(mode, attach, number)],
                          linestyle="--" if simulated else "-"))
    return out


# --- settings in words -----------------------------------------------------------------------

_SUFFIX_UNITS = (
    ("_gbit_per_second", "Gbit/s"), ("_mbit_per_second", "Mbit/s"), ("_gbps", "Gbit/s"),
    ("_mbps", "Mbit/s"), ("_gbit", "Gbit/s"), ("_mbit", "Mbit/s"), ("_ms", "ms"),
    ("_us", "us"), ("_seconds", "s"), ("_bytes", "bytes"),
)


def _setting_words(key: str, value: Any) -> str:
    """``link_mbps: 1000`` -> ``link 1000 Mbit/s``; ``link: "10G"`` -> ``link 10G``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key.replace('_', ' ')} {value}"
    if key.endswith("_bytes_per_second"):
        return f"{key.removesuffix('_bytes_per_second').replace('_', ' ')} {format_rate(value)}"
    for suffix, unit in _SUFFIX_UNITS:
        if key.endswith(suffix):
            return f"{key.removesuffix(suffix).replace('_', ' ')} {_plain(float(value))} {unit}"
    return f"{key.replace('_', ' ')} {_plain(float(value))}"


def _unique(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def _link_words(settings: dict[str, Any]) -> list[str]:
    """The link in words: the testbed's tc ``rate`` and ``delay``, or ``link_*`` keys."""
    words = []
    for key, value in settings.items():
        if value is None or isinstance(value, dict | list):
            continue
        if key == "rate":
            words.append(f"link {value}")
        elif key == "delay":
            applied = settings.get("delay_applied")
            words.append(f"delay {value}{' (not applied)' if applied is False else ''}")
        elif "link" in key or "bandwidth" in key:
            words.append(_setting_words(key, value))
    return words


def _settings_summary(docs: Sequence[Doc]) -> str:
    """VMs per host, link and trace of the documents, for figure titles."""
    runs = [r for d in docs for r in d["runs"] if isinstance(r, dict)]
    settings = [_dict(d.get("settings")) for d in docs]
    parts: list[str] = []
    vms = _unique([_number(r, "vms_per_host") for r in runs]
                  + [_number(s, "vms_per_host") for s in settings])
    if vms:
        count = "/".join(_plain(v) for v in vms)
        parts.append(f"{count} VM{'s' if vms != [1.0] else ''} per host")
    parts.extend(_unique(w for s in settings for w in _link_words(s)))
    if not any("link" in p for p in parts):
        parts.extend(_unique(f"link {r['rate']}" for r in runs if r.get("rate") is not None))
    # A run names the trace it replayed; the settings may only hold a path, or nothing.
    traces = _unique(r.get("trace") for r in runs) or _unique(s.get("trace") for s in settings)
    if traces:
        parts.append(f"trace {', '.join(os.path.basename(str(t)) for t in traces)}")
    speeds = _unique(_number(s, "speed") for s in settings)
    if speeds and speeds != [1.0]:
        parts.append(f"replay speed \u00d7{'/'.join(_plain(v) for v in speeds)}")
    dilations = _unique(_number(s, "dilation") for s in settings)
    if dilations and dilations != [1.0]:
        parts.append(f"time dilation \u00d7{'/'.join(_plain(v) for v in dilations)}")
    return ", ".join(parts)


# --- figures ---------------------------------------------------------------------------------


def _tick_text(value: float, _pos: object = None) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def _spans(values: Sequence[float], decades: float) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= 10**decades


def require_matplotlib() -> None:
    """Fail with the install command if plotting is not installed (a dependency of the tools,
    which an install without dependencies lacks)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "plotting needs matplotlib, which the tools require: "
            "pip install ./tools/bench (scripts/install.sh installs it)"
        ) from err


def _new_figure(panels: int) -> tuple[Figure, list[Axes]]:
    """A figure 900 px wide with ``panels`` plots stacked over one another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, _ = FIG_SIZE
    fig = Figure(figsize=(width, PANEL_HEADER_INCHES + PANEL_INCHES * panels), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.35)
        ax.tick_params(labelsize=10)
    return fig, axes


def _x_axis(ax: Axes, hosts: Sequence[int]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    """Host counts: log scale when they span two decades; a tick at every count if there
    are few (on a linear axis, labels closer than 3% of the axis to the last are left out)."""
    unique = sorted(set(hosts))
    log = _spans([float(h) for h in unique], 2)
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(_tick_text))
    if 0 < len(unique) <= 12:
        labels, last = [], -math.inf
        for h in unique:
            shown = log or h - last >= 0.03 * (unique[-1] - unique[0])
            labels.append(str(h) if shown else "")
            last = h if shown else last
        ax.set_xticks(unique, labels)
    ax.set_xlabel("hosts", fontsize=11)


def _y_axis(ax: Axes, values: Sequence[float], decades: float, label: str) -> bool:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    """Log scale when the values span ``decades`` decades; returns whether it is log."""
    log = _spans(values, decades)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_text))
        if not _spans(values, 2):
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(_tick_text))
        else:
            ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0, top=max(values, default=1.0) * 1.08 or 1.0)
    ax.set_ylabel(label, fontsize=11)
    return log


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, below them, where it cannot hide a line."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=9.5,
                   loc="outside lower center", ncols=2, frameon=False)


def _save(fig: Figure, path: str) -> None:
    # No "Software" (version) entry: the same results rewrite byte-identical files.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def _per_host(runs: Iterable[Run], value: Callable[[Run], float | None]) -> list[tuple[int, float]]:
    by_hosts: dict[int, list[float]] = {}
    for run in runs:
        hosts, v = _hosts(run), value(run)
        if hosts is not None and v is not None:
            by_hosts.setdefault(hosts, []).append(v)
    return [(h, _median(vs)) for h, vs in sorted(by_hosts.items())]


def _plot_line(ax: Axes, points: Sequence[tuple[int, float]], **style: Any) -> None:
    ax.plot([h for h, _ in points], [v for _, v in points], **style)


def _draw_series(ax: Axes, series: list[Series], key: str, scale: float = 1.0,
                 positive_only: bool = False) -> tuple[list[int], int]:
    """One line per series (markers grow down the list and the bigger ones lie under the
    smaller ones, so equal points stay visible);
    returns the host counts drawn and how many non-positive points were left out."""
    hosts: list[int] = []
    dropped = 0
    for i, s in enumerate(series):
        pts = s.points(key)
        if positive_only:
            dropped += sum(1 for _, v in pts if v <= 0)
            pts = [(h, v) for h, v in pts if v > 0]
        if not pts:
            continue
        missing = s.missing(key)
        label = s.label
        if missing:
            label += f" (no result at {', '.join(map(str, missing))} hosts)"
        _plot_line(ax, [(h, v / scale) for h, v in pts], color=s.color, marker=s.marker,
                   markersize=7.0 + min(i, 4), markerfacecolor="none", markeredgewidth=2,
                   linewidth=2, linestyle=s.linestyle, label=label,
                   zorder=4 - i / 100)
        hosts += [h for h, _ in pts]
    return hosts, dropped


def _boot_panel(ax: Axes, series: list[Series]) -> list[str]:
    """Time until all VMs booted against hosts; returns notes for the page."""
    notes: list[str] = []
    all_runs = [r for s in series for r in s.runs]
    single = _per_host(all_runs, lambda r: _number(r, "single_vm_seconds"))
    floors = {s.label: s.points("floor_seconds") for s in series}
    floors = {k: v for k, v in floors.items() if v}
    values = [v for s in series for _, v in s.points("all_booted_seconds")]
    values += [v for _, v in single] + [v for pts in floors.values() for _, v in pts]
    target = [(h, v * TARGET_RATIO) for h, v in single] if any(
        s.mode == "virtman" and s.points("all_booted_seconds") for s in series) else []
    values += [v for _, v in target]
    log = _spans(values, 1)
    hosts, dropped = _draw_series(ax, series, "all_booted_seconds", positive_only=log)
    if single:
        level = {round(v, 9) for _, v in single}
        if len(level) == 1:
            ax.axhline(single[0][1], color="0.35", linestyle="--", linewidth=1.5,
                       label=f"one VM from a local copy ({single[0][1]:.3g} s)")
        else:
            _plot_line(ax, single, color="0.35", linestyle="--", linewidth=1.5,
                       label="one VM from a local copy")
    if target:
        label = f"target for virtman: {_plain(TARGET_RATIO)} \u00d7 one VM"
        if len({round(v, 9) for _, v in target}) == 1:
            ax.axhline(target[0][1], color="tab:red", linestyle="-.", linewidth=1.2, label=label)
        else:
            _plot_line(ax, target, color="tab:red", linestyle="-.", linewidth=1.2, label=label)
    if floors:
        per_hosts: dict[int, set[float]] = {}
        for pts in floors.values():
            for h, v in pts:
                per_hosts.setdefault(h, set()).add(round(v, 9))
        if all(len(v) == 1 for v in per_hosts.values()):
            common = sorted((h, next(iter(v))) for h, v in per_hosts.items())
            _plot_line(ax, common, color="black", linestyle=":", linewidth=2,
                       label="floor (simulated lower bound)")
        else:
            # One legend entry for them all, in black: the colour tells the mode.
            for s in series:
                if s.label in floors:
                    _plot_line(ax, floors[s.label], color=s.color, linestyle=":", linewidth=1.8)
            ax.plot([], [], color="black", linestyle=":", linewidth=1.8,
                    label="floor of each mode (dotted, in its colour)")
        hosts += [h for pts in floors.values() for h, _ in pts]
    if not hosts:
        hosts = [h for h, _ in single]
    _x_axis(ax, hosts)
    _y_axis(ax, values, 1, "seconds")
    if dropped:
        notes.append(f"{dropped} point(s) of 0 s are not drawn on the logarithmic time axis.")
    ax.set_title("time until all VMs booted", fontsize=11)
    return notes


def _roots(run: Run, settings: dict[str, Any]) -> tuple[float, str] | None:
    """Hosts the origin feeds directly, with words that say where the number came from:
    the run's or settings' ``roots``, else min(fan-out, hosts) with the run's or settings'
    ``fanout`` or the relay trees' default."""
    for source in (run, settings):
        roots = _number(source, "roots")
        if roots is not None:
            return roots, "as measured"
    hosts = _hosts(run)
    if hosts is None:
        return None
    fanout = _number(run, "fanout") or _number(settings, "fanout") or float(TREE_FANOUT)
    return min(fanout, float(hosts)), f"min(fan-out {_plain(fanout)}, hosts)"


def _working_set(run: Run, settings: dict[str, Any]) -> float | None:
    """Bytes one boot reads: the run's ``working_set_bytes``, else the settings'."""
    for source, key in ((run, "working_set_bytes"), (settings, "working_set_bytes"),
                        (settings, "working_set")):
        value = _number(source, key)
        if value is not None and value > 0:
            return value
    return None


def _byte_unit(values: Sequence[float], log: bool) -> tuple[float, str]:
    """The largest binary unit the values reach (on a log axis: their geometric middle)."""
    positive = [v for v in values if v > 0]
    top = math.sqrt(min(positive) * max(positive)) if log and positive else max(values, default=0)
    unit, scale = binary_unit(top)
    return float(scale), "bytes" if scale == 1 else unit


def _bytes_panel(ax: Axes, series: list[Series], key: str, what: str,
                 settings_of: dict[int, dict[str, Any]], reference: bool) -> list[str]:
    """Bytes against hosts; returns notes for the page."""
    notes: list[str] = []
    ref: list[tuple[int, float]] = []
    ref_words = ""
    if reference:
        words: set[str] = set()

        def ws_times_roots(run: Run, s: Series) -> float | None:
            settings = settings_of[s.doc_number]
            ws, roots = _working_set(run, settings), _roots(run, settings)
            if ws is None:
                return None
            if roots is None:
                return None
            words.add(roots[1])
            return ws * roots[0]

        ref = _per_host_series(series, ws_times_roots)
        ref_words = ", ".join(sorted(words))
    values = [v for s in series for _, v in s.points(key)] + [v for _, v in ref]
    log = _spans(values, 1)
    scale, unit = _byte_unit(values, log)
    hosts, dropped = _draw_series(ax, series, key, scale, positive_only=log)
    if ref:
        # Under the modes' lines: a mode that meets the reference stays visible on it.
        _plot_line(ax, [(h, v / scale) for h, v in ref], color="0.5", linewidth=7,
                   alpha=0.35, solid_capstyle="round", zorder=2,
                   label=f"working set \u00d7 roots (roots: {ref_words})")
        hosts += [h for h, _ in ref]
    _x_axis(ax, hosts)
    _y_axis(ax, [v / scale for v in values], 1, unit)
    if dropped:
        notes.append(f"{dropped} point(s) of 0 bytes are not drawn on the logarithmic axis of "
                     f"'{what}'.")
    ax.set_title(what, fontsize=11)
    return notes


def _per_host_series(series: list[Series],
                     value: Callable[[Run, Series], float | None]) -> list[tuple[int, float]]:
    by_hosts: dict[int, list[float]] = {}
    for s in series:
        for run in s.runs:
            hosts, v = _hosts(run), value(run, s)
            if hosts is not None and v is not None:
                by_hosts.setdefault(hosts, []).append(v)
    return [(h, _median(vs)) for h, vs in sorted(by_hosts.items())]


# --- Markdown --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return MISSING if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: float | None) -> str | None:
    """Seconds and ratios: two decimals, one from 100 up."""
    if value is None:
        return None
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"


def _mib(value: float | None) -> str | None:
    return None if value is None else f"{value / MiB:.1f}"


def _table(rows: list[list[str | None]], header: list[str], text: Sequence[str] = ()) -> list[str]:
    """A Markdown table: numbers right-aligned, the ``text`` columns left-aligned."""
    rule = "|".join(":---" if h in text else "---:" for h in header)
    out = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _error_vms(run: Run) -> int | None:
    value = run.get("error_vms")
    if isinstance(value, list | tuple | dict):
        return len(value)
    number = _number(run, "error_vms")
    return int(number) if number is not None else None


def _run_notes(run: Run, varying: dict[str, bool]) -> str | None:
    notes: list[str] = []
    failed = _error_vms(run)
    if failed:
        notes.append(f"{failed} VM{'s' if failed != 1 else ''} failed")
    if run.get("cpu_limited"):
        notes.append("CPU-limited")
    if varying.get("trace") and run.get("trace") is not None:
        notes.append(f"trace {os.path.basename(str(run['trace']))}")
    error = run.get("error")
    if error:
        notes.append(f"error: {error}")
    return "; ".join(notes) or None


def _levels(value: Any) -> str | None:
    """``{"1": 33.9, "2": 35.4}`` -> ``1: 33.9, 2: 35.4``."""
    if not isinstance(value, dict) or not value:
        return None
    pairs = sorted((int(k), v) for k, v in value.items() if str(k).isdigit())
    return ", ".join(f"{k}: {_fmt(float(v))}" for k, v in pairs) or None


def _why(run: Run) -> str:
    error, failed = run.get("error"), _error_vms(run)
    if error:
        return f" (error: {error})"
    if failed:
        return f" ({failed} VM{'s' if failed != 1 else ''} failed)"
    return ""


def _document_section(number: int, doc: Doc, series: list[Series]) -> list[str]:
    settings, machine = _dict(doc.get("settings")), _dict(doc.get("machine"))
    kind = str(doc.get("kind", "unknown"))
    command = doc.get("command")
    if isinstance(command, list):
        command = shlex.join(str(c) for c in command)
    out = [f"### Document {number}: {KIND_NAME.get(kind, kind)}", ""]
    if doc.get("source"):
        out.append(f"- File: `{doc['source']}`")
    out.append(f"- Kind: {kind}")
    out.append(f"- Machine: {', '.join(f'{k} {v}' for k, v in machine.items()) or MISSING}")
    out += ["- Command line:", "", "  ```", f"  {command if command else MISSING}", "  ```", ""]
    if settings:
        out += ["Settings:", ""]
        pairs: list[list[str | None]] = [
            [f"`{k}`", v if isinstance(v, str) else json.dumps(v)]
            for k, v in settings.items()]
        out += _table(pairs, ["setting", "value"], text=["setting", "value"])
        out.append("")

    own = [s for s in series if s.doc_number == number]
    runs = [r for s in own for r in s.runs]
    has = {k: any(r.get(k) is not None for r in runs)
           for k in ("floor_seconds", "depth", "working_set_bytes", "all_booted_by_level",
                     "agents_cpu_seconds")}
    floors = kind == "simulation" or has["floor_seconds"]
    varying = {"trace": len(_unique(r.get("trace") for r in runs)) > 1,
               "vms_per_host": len(_unique(_number(r, "vms_per_host") for r in runs)) > 1}
    header = ["hosts"]
    if varying["vms_per_host"]:
        header.append("VMs/host")
    header += ["all booted (s)", "mean (s)", "p99 (s)", "all booted / one VM",
               "origin (MiB)", "origin / working set", "max host (MiB)"]
    if floors:
        header += ["floor (s)", "all booted / floor"]
    if has["depth"]:
        header.append("depth")
    if has["all_booted_by_level"]:
        header.append("all booted by tree level (s)")
    if has["agents_cpu_seconds"]:
        header.append("CPU s: agents / VMs")
    header.append("notes")

    skipped: list[str] = []
    for s in own:
        rows: list[list[str | None]] = []

        def order(run: Run) -> tuple[int, float]:
            return (_hosts(run) or 0, _number(run, "vms_per_host") or 0)

        for run in sorted(s.runs, key=order):
            hosts = _hosts(run)
            booted = _number(run, "all_booted_seconds")
            origin = _number(run, "origin_bytes_sent")
            ws = _working_set(run, settings)
            if hosts is None:
                skipped.append(f"{s.name}: a run without a host count{_why(run)}")
            else:
                lacks = [what for what, value in (("time until all booted", booted),
                                                  ("origin byte count", origin))
                         if value is None]
                if lacks:
                    skipped.append(f"{s.name} at {hosts} hosts: no {' and no '.join(lacks)}"
                                   f"{_why(run)}")
            row: list[str | None] = [str(hosts) if hosts is not None else None]
            if varying["vms_per_host"]:
                vms = _number(run, "vms_per_host")
                row.append(_plain(vms) if vms is not None else None)
            row += [
                _fmt(booted),
                _fmt(_number(run, "mean_boot_seconds")),
                _fmt(_number(run, "p99_boot_seconds")),
                _fmt(_ratio(booted, _number(run, "single_vm_seconds"))),
                _mib(origin),
                _fmt(_ratio(origin, ws)),
                _mib(_number(run, "max_host_bytes_sent")),
            ]
            if floors:
                floor = _number(run, "floor_seconds")
                row += [_fmt(floor), _fmt(_ratio(booted, floor))]
            if has["depth"]:
                depth = _number(run, "depth")
                row.append(_plain(depth) if depth is not None else None)
            if has["all_booted_by_level"]:
                row.append(_levels(run.get("all_booted_by_level")))
            if has["agents_cpu_seconds"]:
                agents, vms = _number(run, "agents_cpu_seconds"), _number(run, "vms_cpu_seconds")
                row.append(f"{agents:.1f} / {vms:.1f}" if agents is not None and vms is not None
                           else None)
            row.append(_run_notes(run, varying))
            rows.append(row)
        out += [f"#### {s.name}", "", *_table(rows, header, text=["notes"]), ""]
    if not own:
        out += ["This document has no runs.", ""]
    if skipped:
        out += ["Left out of the figures (missing or failed measurements):", ""]
        out += [f"- {line}" for line in skipped] + [""]
    return out


HOW_TO_READ = """\
## How to read this page

Each scenario (one setting: a testbed run with the simulations calibrated against it,
or simulations that differ only in the modes they ran) has one figure of up to three
panels, all against the number of hosts, with one legend below them. A line is a mode:
`star` (every host reads from the origin), `copy` (every host copies the whole image
first), `paper` (the paper's scheme; variants by attach delay) and `virtman` (lazy
relays in a tree). Where a scenario has a measured and a simulated line of a mode, the
simulated one is dashed in the same colour.

- **Time until all VMs booted** (top panel): the moment the last VM of the run finished
  booting, counted from the start of the run. The grey dashed line is one VM booting
  from a local copy of the image, the best any mode can do; the red dash-dotted line the
  target for `virtman` mode, 1.3 times that. In simulations the black dotted line is the
  floor, the simulator's lower bound for that host count. A flat line means the
  mode scales; a line that climbs with the hosts means a bottleneck (usually the
  origin's link).
- **Bytes sent by the origin** (middle panel): what the origin had to send in total. The
  wide grey reference line is the working set (the bytes a boot reads) times the roots, the
  hosts the origin feeds directly (`min(fan-out, hosts)` for a relay tree): a scheme that
  relays well stays on it however many hosts boot.
- **Most bytes sent by one host** (bottom panel, when measured): the heaviest relay's load.
- Axes switch to a logarithmic scale when the values span decades (hosts: two decades,
  times and bytes: one). Times are seconds; MiB and GiB are 2^20 and 2^30 bytes.
- Tables: *all booted / one VM* is the time until all booted over the one-VM time (1.0 is
  perfect); *origin / working set* is the origin's bytes over the working set (about the
  number of roots when relaying works, about the host count when it does not); *all
  booted / floor* (simulations) is how far a run is from the simulator's lower bound;
  *all booted by tree level* is the slowest boot among the hosts of each level (a step
  per level is latency each relay hop adds); *CPU s* is what the agents and the
  stand-in VMs used during the boot; *CPU-limited* in the notes marks a run whose cores
  were saturated more than a fifth of the time.
  `—` marks a value the run does not have (a failed mode, or a key the run did not write).
"""


def _link(target: str, md_dir: str) -> str:
    rel = os.path.relpath(os.path.abspath(target), md_dir).replace(os.sep, "/")
    return f"<{rel}>" if re.search(r"[\s()<>]", rel) else rel


def _prefix(kind: str) -> str:
    return KIND_PREFIX.get(kind) or re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "results"


# --- the report ------------------------------------------------------------------------------


def _scenario_figure(sc: Scenario, summary: str, path: str) -> list[str] | None:
    """The scenario's figure (time until all booted, origin bytes, most bytes sent by one
    host: the panels it has data for) at ``path``; its notes, or None if nothing to plot."""
    series = sc.series
    settings_of = {n: _dict(d.get("settings")) for n, d in sc.docs}
    panels: list[Callable[[Axes], list[str]]] = []
    if any(s.points("all_booted_seconds") for s in series):
        panels.append(lambda ax: _boot_panel(ax, series))
    if any(s.points("origin_bytes_sent") for s in series):
        panels.append(lambda ax: _bytes_panel(ax, series, "origin_bytes_sent",
                                              "bytes sent by the origin", settings_of, True))
    if any(s.points("max_host_bytes_sent") for s in series):
        panels.append(lambda ax: _bytes_panel(ax, series, "max_host_bytes_sent",
                                              "most bytes sent by one host", settings_of,
                                              False))
    if not panels:
        return None
    require_matplotlib()
    fig, axes = _new_figure(len(panels))
    notes = [note for draw, ax in zip(panels, axes, strict=True) for note in draw(ax)]
    head = f"Scenario {sc.number}, {sc.name()}"
    fig.suptitle("\n".join([head, *textwrap.wrap(summary, 95)]) if summary else head,
                 fontsize=12)
    _legend(fig, axes)
    _save(fig, path)
    return notes


def make_report(docs: Sequence[Doc], out_dir: str, md_path: str, title: str) -> list[str]:
    """Write one figure per scenario into ``out_dir`` and the page to ``md_path``; return
    the files written."""
    if not docs:
        raise ConfigError("no result documents to report on")
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
            raise ConfigError("a result document must be an object with a list of runs")
    os.makedirs(out_dir, exist_ok=True)
    md_dir = os.path.dirname(os.path.abspath(md_path))
    os.makedirs(md_dir, exist_ok=True)

    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[_kind(doc)] = kinds.get(_kind(doc), 0) + 1
    scenarios = _scenarios(docs)

    written: list[str] = []
    md = [f"# {title}", ""]
    md.append(f"Made by `virtman bench report` from {len(docs)} result "
              f"document{'s' if len(docs) != 1 else ''} "
              f"({', '.join(f'{KIND_NAME.get(k, k).lower()} {n}' for k, n in kinds.items())})"
              f" in {len(scenarios)} scenario{'s' if len(scenarios) != 1 else ''}.")
    md += ["", HOW_TO_READ]
    for sc in scenarios:
        summary = _settings_summary(sc.measured)
        md += [f"## Scenario {sc.number}, {sc.name()}", ""]
        if summary:
            md += [f"Settings: {summary}.", ""]
        parts = []
        for number, doc in sc.docs:
            against = _calibrated_against(doc)
            parts.append(f"document {number} ({_kind(doc)}"
                         + (f", calibrated against {against})" if against else ")"))
        md += [f"From {', '.join(parts)}.", ""]
        path = os.path.join(out_dir, f"{sc.slug}.png")
        notes = _scenario_figure(sc, summary, path)
        if notes is None:
            md += ["No run of this scenario has a host count with a measurement: "
                   "nothing to plot.", ""]
        else:
            md += [f"![Scenario {sc.number}, {sc.name()}]({_link(path, md_dir)})", ""]
            md += [f"- {n}" for n in notes] + ([""] if notes else [])
            written.append(path)
        for number, doc in sc.docs:
            md += _document_section(number, doc, sc.series)
    text = "\n".join(md).rstrip("\n") + "\n"
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    written.append(md_path)
    return written


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULT.json",
                   help="result documents of 'virtman bench scale' or 'virtman bench simulate'")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"directory for the PNG figures (default {DEFAULT_OUT_DIR})")
    p.add_argument("--markdown", default=DEFAULT_MARKDOWN,
                   help=f"the Markdown page to write (default {DEFAULT_MARKDOWN})")
    p.add_argument("--title", default=DEFAULT_TITLE, help="the page's title")


def run(args: argparse.Namespace) -> int:
    docs = load(args.results)
    for path in make_report(docs, args.out_dir, args.markdown, args.title):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtman bench report", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except VirtmanError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
