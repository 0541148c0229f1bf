"""The markdown report of `benchmarks.device_check`'s results (correctness, then timings)."""

IMPLS = ("pallas_gpu", "chunked", "jla", "fla")
MODES = (("forward", "fwd"), ("forward_backward", "f+b"))


def _cell(x, fmt="{:.2f}"):
    return "" if x is None else fmt.format(x)


def _worst(row):
    """(worst max_error / bound, that array's max error) of a correctness row."""
    arrays = [a for a in row.get("arrays", []) if a.get("max_error") is not None]
    if not arrays:
        return None, None
    worst = max(arrays, key=lambda a: a["max_error"] / a["bound"])
    return worst["max_error"] / worst["bound"], worst["max_error"]


def _correctness_note(row):
    if "error" in row:  # status "error" (the exception's first line) or "skipped"
        return row["error"].splitlines()[0][:200]
    return "; ".join(a["message"][:120] for a in row.get("arrays", []) if not a["ok"])


def _timing_note(row):
    notes = [row["skipped"]] if "skipped" in row else []
    if "error" in row:
        notes.append(row["error"].splitlines()[0][:160])
    notes += [f"{key}: {text.splitlines()[0][:160]}" for key, text in row["notes"].items()]
    return "; ".join(notes).replace("|", "/")


def markdown(results):
    meta = results["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"# Device check: {', '.join(sorted(set(meta['devices'])))}",
        "",
        f"- date: {meta['date']}; mode: {meta['mode']}; elapsed {meta.get('elapsed_s')} s "
        f"(budget {meta['budget_s']} s)",
        f"- machine: {meta['machine']}",
        f"- versions: {versions}",
        f"- command: `{meta['command']}`",
        "",
        "## Correctness: Pallas GPU kernel vs chunked XLA (float32, CPU device)",
        "",
        "worst = max over arrays of max error / (tol · max(1, max |expected|)); pass needs <= 1.",
        "",
        "| family | case | status | tol | worst | its max error | s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["correctness"]:
        ratio, error = _worst(row)
        note = _correctness_note(row).replace("|", "/").replace("\n", " ")
        tol = _cell(row.get("tol"), "{:g}")
        lines.append(
            f"| {row['family']} | {row['case']} | {row['status']} | {tol} "
            f"| {_cell(ratio, '{:.3f}')} | {_cell(error, '{:.2e}')} | {row['seconds']} | {note} |"
        )
    header = [f"{impl} {short}" for _, short in MODES for impl in IMPLS]
    lines += [
        "",
        f"## Timing: median of {meta['repeats']} runs after a warm-up (ms)",
        "",
        "| family | rule | B | T | H | D | dtype | "
        + " | ".join(header)
        + " | kernel speedup fwd | kernel speedup f+b | notes |",
        "|" + "---|" * (7 + len(header) + 3),
    ]
    for row in results["timing"]:
        times = row["times_ms"]
        cells = [row["family"], row["rule"]] + [
            str(row[k]) for k in ("batch", "length", "heads", "dim", "dtype")
        ]
        cells += [_cell(times.get(f"{impl} {mode}")) for mode, _ in MODES for impl in IMPLS]
        for mode, _ in MODES:
            kernel, chunked = times.get(f"pallas_gpu {mode}"), times.get(f"chunked {mode}")
            cells.append(_cell(chunked / kernel if kernel and chunked else None, "{:.2f}x"))
        cells.append(_timing_note(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
