"""Records of the metrics feed -> Plotly figures: the one set of charts that the live page and the report draw.

    records, _ = read_records("runs/default")
    figures = build_figures(records)  # {"rewards": {"data": [...], "layout": {...}}, ...}, in CHARTS order

Every figure is built with plotly.graph_objects and handed over as its JSON dict, which the browser draws with
`Plotly.react(div, fig.data, fig.layout)`. Names that come from data (reward names, methods, families) are
HTML-escaped before they reach a figure, since Plotly renders a few tags (<b>, <br>, <a>) in text. A resumed run
repeats steps; the last record of a step wins. A chart without data says so in its middle instead of going blank.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable

import plotly.colors
import plotly.graph_objects as go

LOSS_KEYS = ["loss/total", "loss/on", "loss/off", "loss/anchor"]
POLICY_KEYS = ["kl", "ppo/clip_fraction", "ppo/dropped_share"]
BUFFER_KEYS = ["buffer/waiting", "batch/on", "batch/off"]
TIME_KEYS = ["time/step", "time/train", "time/rollout", "time/sync"]
EVAL_METRIC = "ndcg@10"
COLORS = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.D3
DASHES = ["solid", "dot", "dash", "dashdot"]


def latest_steps(records: list[dict]) -> list[dict]:
    """The `step` records, one per step (the last written wins: a resumed run repeats steps), by step."""
    by_step = {r["step"]: r for r in records if r.get("kind") == "step" and r.get("step") is not None}
    return [by_step[s] for s in sorted(by_step)]


def _layout(title: str, y_title: str, **extra) -> dict:
    return dict(title=dict(text=title, x=0.02, font=dict(size=15)), template="plotly_white", height=320,
                margin=dict(l=55, r=20, t=45, b=40), xaxis=dict(title=dict(text="learner step")),
                yaxis=dict(title=dict(text=y_title)), legend=dict(orientation="h", y=-0.18, font=dict(size=11)),
                uirevision="keep", **extra)  # uirevision: a redraw keeps the user's zoom and hidden traces


def _line(steps: list[dict], key: str, name: str | None = None, **extra) -> go.Scatter | None:
    """One figure over steps (None where a step lacks it); None when no step has it."""
    ys = [s.get(key) for s in steps]
    if all(y is None for y in ys):
        return None
    return go.Scatter(x=[s["step"] for s in steps], y=ys, mode="lines+markers", marker=dict(size=4),
                      name=html.escape(name or key), **extra)


def _figure(traces: list, layout: dict) -> dict:
    traces = [t for t in traces if t is not None]
    xs = [x for t in traces for x in t.x or ()]
    if xs and all(isinstance(x, int) for x in xs) and max(xs) - min(xs) <= 12:
        layout["xaxis"]["dtick"] = 1  # a short run: whole steps only, not 1.5
    fig = go.Figure(traces, layout)
    if not fig.data:
        fig.add_annotation(text="no data yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=14, color="#888"))
    return json.loads(fig.to_json())


def rewards_figure(steps: list[dict]) -> dict:
    """Each reward's mean raw score of the batch's rollouts, and the weighted total, per step."""
    names = sorted({k for s in steps for k in s if k.startswith("reward/") and k != "reward/total"})
    return _figure([_line(steps, k) for k in [*names, "reward/total"]], _layout("Rewards", "mean per rollout"))


def losses_figure(steps: list[dict]) -> dict:
    return _figure([_line(steps, k) for k in LOSS_KEYS], _layout("Loss terms", "loss"))


def policy_figure(steps: list[dict]) -> dict:
    """KL to the reference, PPO clip fraction and the share of slots dropped by the importance-weight cap."""
    return _figure([_line(steps, k) for k in POLICY_KEYS], _layout("KL, clipping, dropped slots", "value"))


def staleness_figure(steps: list[dict]) -> dict:
    """Rollout groups trained on, by staleness (learner version minus sampling version): all steps and the last."""
    total: dict[int, int] = {}
    for s in steps:
        for level, groups in (s.get("staleness") or {}).items():
            total[int(level)] = total.get(int(level), 0) + groups
    traces = []
    if total:
        levels = sorted(total)
        last = {int(k): v for k, v in (steps[-1].get("staleness") or {}).items()}
        traces = [go.Bar(x=levels, y=[total[v] for v in levels], name="all steps"),
                  go.Bar(x=levels, y=[last.get(v, 0) for v in levels], name=f"step {steps[-1]['step']}")]
    layout = _layout("Staleness of trained rollouts", "groups", barmode="group")
    layout["xaxis"] = dict(title=dict(text="versions behind the learner"), dtick=1)
    return _figure(traces, layout)


def buffer_figure(steps: list[dict]) -> dict:
    """Groups left waiting in the replay buffer, and each batch's on-policy groups and off-policy pairs."""
    names = {"buffer/waiting": "waiting groups", "batch/on": "batch: rollout groups", "batch/off": "batch: pairs"}
    return _figure([_line(steps, k, names[k]) for k in BUFFER_KEYS], _layout("Replay buffer", "count"))


def throughput_figure(steps: list[dict]) -> dict:
    """Rollout lists per second of every rollout actor."""
    return _figure(_per_actor(steps, "lists_per_s"), _layout("Rollout throughput", "lists / s"))


def _per_actor(steps: list[dict], key: str) -> list[go.Scatter]:
    actors = sorted({a["actor"] for s in steps for a in s.get("actors") or []}, key=str)
    traces = []
    for actor in actors:
        values = {s["step"]: a.get(key) for s in steps for a in s.get("actors") or [] if a["actor"] == actor}
        xs = sorted(values)
        traces.append(go.Scatter(x=xs, y=[values[x] for x in xs], mode="lines+markers", marker=dict(size=4),
                                 name=html.escape(f"actor {actor}")))
    return traces


def timing_figure(steps: list[dict]) -> dict:
    """Seconds per learner step and its parts; the learner's idle fraction on the right axis."""
    traces = [_line(steps, k) for k in TIME_KEYS]
    traces.append(_line(steps, "learner/idle_fraction", "idle fraction (right)", yaxis="y2",
                        line=dict(dash="dot")))
    layout = _layout("Learner step time", "seconds",
                     yaxis2=dict(title=dict(text="idle fraction"), overlaying="y", side="right", range=[0, 1],
                                 tickmode="linear", dtick=0.25, tickformat=".0%", showgrid=False))
    layout["margin"]["r"] = 55
    return _figure(traces, layout)


def versions_figure(steps: list[dict]) -> dict:
    """The version that sampled each rollout actor's rollouts of a step, next to the learner's version after the
    step: sync runs sit one below the learner, async runs two (the rollouts were generated during the step before,
    with the weights published before that one: staleness 1 when the batch was taken)."""
    traces = [_line(steps, "version", "learner (after the step)", line=dict(width=4, color="#bbb")),
              *_per_actor(steps, "version")]
    return _figure(traces, _layout("Weight versions", "version"))


def eval_figure(records: list[dict], steps: list[dict]) -> dict:
    """NDCG@10 of H2PO evaluations over learner steps, per family; the other methods (baselines, MOST) and any
    evaluation without a step as horizontal reference lines (their latest figure). One colour per method, one
    line style per family."""
    curves: dict[tuple, dict] = {}
    references: dict[tuple, float] = {}
    for r in (r for r in records if r.get("kind") == "eval" and EVAL_METRIC in (r.get("metrics") or {})):
        key = (str(r.get("method")), str(r.get("family") or "all"))
        if r.get("method") == "H2PO" and r.get("step") is not None:
            curves.setdefault(key, {})[r["step"]] = r["metrics"][EVAL_METRIC]
        else:
            references[key] = r["metrics"][EVAL_METRIC]
    span = [s["step"] for s in steps] + [x for c in curves.values() for x in c] or [0, 1]
    x_range = [min(span), max(max(span), min(span) + 1)]
    methods = sorted({m for m, _ in [*curves, *references]}, key=lambda m: (m != "H2PO", m))
    families = sorted({f for _, f in [*curves, *references]})

    def style(method: str, family: str) -> dict:
        return dict(color=COLORS[methods.index(method) % len(COLORS)], dash=DASHES[families.index(family) % 4])
    traces = [go.Scatter(x=sorted(c), y=[c[x] for x in sorted(c)], mode="lines+markers", line=style(*key),
                         name=html.escape(" ".join(key))) for key, c in sorted(curves.items())]
    traces += [go.Scatter(x=x_range, y=[value, value], mode="lines", line=dict(width=1.5, **style(*key)),
                          name=html.escape(" ".join(key))) for key, value in sorted(references.items())]
    layout = _layout("Validation NDCG@10: H2PO over steps, reference methods as flat lines", "NDCG@10")
    layout.update(height=420, legend=dict(orientation="v", x=1.02, y=1, font=dict(size=11)))
    layout["margin"]["r"] = 10
    return _figure(traces, layout)


CHARTS: dict[str, Callable[[list[dict], list[dict]], dict]] = {  # name -> (records, steps) -> figure
    "rewards": lambda records, steps: rewards_figure(steps),
    "losses": lambda records, steps: losses_figure(steps),
    "policy": lambda records, steps: policy_figure(steps),
    "staleness": lambda records, steps: staleness_figure(steps),
    "buffer": lambda records, steps: buffer_figure(steps),
    "throughput": lambda records, steps: throughput_figure(steps),
    "timing": lambda records, steps: timing_figure(steps),
    "versions": lambda records, steps: versions_figure(steps),
    "eval": eval_figure,
}


def build_figures(records: list[dict]) -> dict[str, dict]:
    """Every chart of CHARTS as a Plotly JSON dict ({"data": [...], "layout": {...}})."""
    steps = latest_steps(records)
    return {name: build(records, steps) for name, build in CHARTS.items()}
