"""PNG plots of the benchmark results, for the README to embed.

    python -m benchmarks.plots [--results benchmarks/results]

Reads whichever of these exist in `--results` and writes a PNG next to each, titled with
the machine and date recorded in the JSON:

    layer_cost_<backend>.json  -> layer_cost_<backend>.png  time and compiled peak memory vs T
                                  per block kind, log-log, with T and T^2 guide lines
    throughput_<backend>.json  -> throughput_<backend>.png  training tokens/s per model, size
    model_comparison.json      -> model_comparison.png      recall, S-NIAH, bits/byte,
                                  tokens/s and decoding-cache bytes per model
    mqar_recall.json           -> mqar_recall.png           MQAR eval recall vs training
                                  step of each kind's shipped recipe, one line per seed
"""

import argparse
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _title(header: dict, what: str) -> str:
    return f"{what}\n{header['machine']}, {header['date']}"


def plot_layer_cost(payload: dict, path: pathlib.Path) -> pathlib.Path:
    """Two log-log panels: forward+backward median time and compiled peak memory vs T."""
    rows = payload["rows"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    panels = (("median_s", 1e3, "forward + backward time (ms)"),
              ("compiled_peak_bytes", 2**-20, "compiled peak memory (MiB)"))  # fmt: skip
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colours = plt.get_cmap("tab20")
    for axis, (key, scale, label) in zip(axes, panels, strict=True):
        lowest = []
        for index, kind in enumerate(kinds):
            points = [
                (r["length"], r["forward_backward"][key] * scale)
                for r in rows
                if r["kind"] == kind
                and r["forward_backward"].get("status") == "ok"
                and r["forward_backward"].get(key) is not None
            ]
            if not points:
                continue
            style = "--" if index >= 10 else "-"
            axis.plot(*zip(*points), style, marker="o", color=colours(index % 20), label=kind)
            lowest.append(points[0])
        if lowest:  # guide lines through the smallest first point: slope 1 and slope 2
            start_length, start_value = min(lowest, key=lambda p: p[1])
            longest = max(r["length"] for r in rows)
            for power, name in ((1, "∝ T"), (2, "∝ T²")):
                end = start_value * (longest / start_length) ** power
                axis.plot([start_length, longest], [start_value, end], ":", color="grey")
                axis.annotate(name, (longest, end), color="grey", fontsize=8)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    figure.suptitle(_title(payload, "Layer cost of one block, forward + backward"))
    figure.text(0.5, 0.005, payload["settings"], ha="center", fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_throughput(payload: dict, path: pathlib.Path) -> pathlib.Path:
    rows = payload["rows"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    figure, axis = plt.subplots(figsize=(max(6, 0.7 * len(names) + 3), 4.5))
    width = 0.8 / max(len(sizes), 1)
    for offset, size in enumerate(sizes):
        values = {r["model"]: r["tokens_per_second"] for r in rows if r["size"] == size}
        xs = [i + offset * width for i, name in enumerate(names) if name in values]
        axis.bar(xs, [values[n] for n in names if n in values], width, label=size)
    axis.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))], names)
    axis.tick_params(axis="x", rotation=45)
    axis.set_ylabel("training tokens/s")
    axis.legend()
    axis.set_title(_title(payload, "Training throughput"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _cache_kib(cache: dict | None, length: int) -> float:
    if not cache:
        return float("nan")
    return (cache["fixed"] + length * cache["per_token"]) / 1024


def plot_model_comparison(payload: dict, path: pathlib.Path) -> pathlib.Path:
    rows = payload["rows"]
    several_seeds = len({r.get("seed", 0) for r in rows}) > 1
    names = [f"{r['model']} (seed {r.get('seed', 0)})" if several_seeds else r["model"]
             for r in rows]  # fmt: skip
    panels = (
        ("MQAR recall (%)", lambda r: 100 * r.get("mqar", {}).get("eval_accuracy", float("nan"))),
        ("S-NIAH accuracy (%)", lambda r: 100 * _number(r.get("niah", {}).get("accuracy"))),
        ("text bits/byte (lower is better)",
         lambda r: r.get("text", {}).get("bits_per_token", float("nan"))),
        ("text training tokens/s",
         lambda r: r.get("text", {}).get("tokens_per_second") or float("nan")),
        ("decoding cache at T=4096 (KiB, batch 1)",
         lambda r: _cache_kib(r.get("cache"), 4096)),
    )  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.5))
    for axis, (label, value) in zip(axes, panels, strict=True):
        values = [value(r) for r in rows]
        axis.barh(names, values, color="tab:blue")
        axis.invert_yaxis()
        if not any(math.isfinite(v) for v in values):
            axis.text(0.5, 0.5, "not in this run", ha="center", transform=axis.transAxes)
        elif "cache" in label and any(v > 0 for v in values):
            axis.set_xscale("log")  # KV caches are orders of magnitude above memory states
        else:
            axis.set_xlim(left=0)
        axis.set_title(label, fontsize=10)
        axis.grid(True, axis="x", alpha=0.3)
    figure.suptitle(_title(payload, "All models at one size (commands: model_comparison.md)"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_recall_curves(payload: dict, path: pathlib.Path) -> pathlib.Path:
    """Recall vs step, one panel per task size: on the shipped task the runs at each kind's
    shipped recipe (`configs.mqar.recipe`), one line per (kind, seed), a colour per kind; on
    the larger tasks, which ship no recipe, every run, a colour per (kind, lr)."""
    from configs import mqar

    config = mqar.get_config()
    shipped_task = (config.data.mqar.num_kv_pairs, config.data.seq_len)

    def on_shipped_task(row):
        return (row["num_kv_pairs"], row["seq_len"]) == shipped_task

    def shipped(row):
        recipe = mqar.recipe(row["kind"])
        wanted = (recipe["learning_rate"], recipe["batch_size"])
        return (row["lr"], row["batch_size"]) == wanted or not on_shipped_task(row)

    def series(row):
        return row["kind"] if on_shipped_task(row) else f"{row['kind']} lr {row['lr']:g}"

    rows = [r for r in payload["rows"] if r.get("curve") and shipped(r)]
    tasks = sorted({(r["num_kv_pairs"], r["seq_len"]) for r in rows})
    figure, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.8))
    axes = [axes] if len(tasks) <= 1 else list(axes)
    kinds = list(dict.fromkeys(series(r) for r in rows))
    colours = plt.get_cmap("tab20")
    for axis, task in zip(axes, tasks):
        labelled = set()
        for row in (r for r in rows if (r["num_kv_pairs"], r["seq_len"]) == task):
            steps = sorted(row["curve"], key=int)
            values = [100 * row["curve"][step] for step in steps]
            name = series(row)
            colour = colours(kinds.index(name) % 20)
            label = None if name in labelled else name
            labelled.add(name)
            axis.plot([int(s) for s in steps], values, marker=".", color=colour, label=label)
        axis.set(xlabel="training step", ylabel="eval recall (%)", ylim=(0, 101))
        axis.set_title(f"MQAR, {task[0]} pairs, T {task[1]}", fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, ncol=2, loc="lower right")
    figure.suptitle("MQAR recall through train.py (8 pairs: each kind's shipped recipe), all seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PLOTTERS = (
    ("layer_cost_*.json", plot_layer_cost),
    ("throughput_*.json", plot_throughput),
    ("model_comparison.json", plot_model_comparison),
    ("mqar_recall.json", plot_recall_curves),
)


def plot_all(results: pathlib.Path) -> list[pathlib.Path]:
    """Every plot whose JSON exists in `results`; returns the PNG paths written."""
    written = []
    for pattern, plotter in PLOTTERS:
        for source in sorted(results.glob(pattern)):
            payload = json.loads(source.read_text())
            if payload.get("rows"):
                written.append(plotter(payload, source.with_suffix(".png")))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in plot_all(args.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
