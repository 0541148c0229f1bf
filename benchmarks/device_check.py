"""One-command check of the Pallas GPU kernels on a real GPU: correctness, then timings.

    python -m benchmarks.device_check [--out PATH] [--budget_s 420]   # on a GPU machine
    python -m benchmarks.device_check --cpu-smoke --out /tmp/x.json   # the same paths on CPU

(`benchmarks/device_check.sh` wraps it for the device tool: installs the carried wheels,
then runs this.) Without a visible GPU it prints one line, "device_check: no GPU visible to
jax (devices: ...)", and exits with status 2, unless `--cpu-smoke`.

1. Correctness: every Pallas GPU kernel (`impl="pallas_gpu"`, compiled, not interpreted) --
   the four matrix-memory rules and the Titans deep memory -- on small shapes, outputs,
   final states and every gradient, against the chunked XLA path run on the CPU device (full
   float32 matmuls; on the GPU XLA may use TF32), with the interpret-mode tests' inputs,
   helpers and tolerances (imported from tests/pallas_kernels/). Each case is caught on its
   own: a compiler error is recorded with its text and the next case runs.
2. Timing: kernel vs chunked XLA (and jla's Mosaic GPU op and fla's Triton kernel when they
   import; a note when not) on the same inputs, forward and forward+backward, B 8, H 16,
   T 4K..32K, D 64 / 128 for the matrix memories and D 16 / 32 (what impl="auto" sends the
   GPU kernel) for the deep memory, bf16 and f32; medians of `--repeats` after a warm-up,
   with `block_until_ready` / `torch.cuda.synchronize`. Cases past the time budget are
   skipped, each with that reason.
3. Results: the JSON file (`--out`, default `$OUT/device_check.json`, else
   benchmarks/results/) and `device_check.md` beside it, rewritten after every case so a
   run cut short keeps what it measured; the markdown is printed at the end.

`--cpu-smoke`: tiny shapes, kernels in interpret mode, one timing repeat, no jla / fla.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform as host
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_check_report as report

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "numpy", "torch",
            "triton", "jax-linear-attention", "fla-core", "flash-linear-attention")  # fmt: skip
LINEAR_RULES = ("linear_attention", "simple_gla", "delta_rule", "gated_delta_rule")
# Our rule -> jla's kind (jla.ops.linear_attention) and fla's chunk op (module, function).
JLA_KINDS = {"simple_gla": "simple_gla", "delta_rule": "deltanet",
             "gated_delta_rule": "gated_deltanet"}  # fmt: skip
FLA_OPS = {
    "linear_attention": ("fla.ops.linear_attn", "chunk_linear_attn"),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}
MODES = ("forward", "forward_backward")


def versions():
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def short_error(error, limit=4000):
    """The exception's text (compiler output included), head and tail if it is long."""
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    if len(text) > limit:
        text = text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]
    return text


# ----------------------------------------------------------------------------- correctness


def compare(actual, expected, tol, assert_close):
    """Per array of the two (same-structured) pytrees: max error, the tests' bound
    tol * max(1, max |expected|), and the tests' own verdict (`assert_close`)."""
    rows = []
    expected_leaves = jax.tree.leaves(expected)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(actual), expected_leaves):
        name = jax.tree_util.keystr(path)
        got32, want32 = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want))
        row = dict(array=name, bound=tol * max(1.0, float(np.max(np.abs(want32)))))
        same = got32.shape == want32.shape
        row["max_error"] = float(np.max(np.abs(got32 - want32))) if same else None
        try:
            assert_close(got, want, tol, name)
            row["ok"] = True
        except AssertionError as error:
            row.update(ok=False, message=str(error))
        rows.append(row)
    if len(rows) != len(expected_leaves):
        rows.append(dict(array="<structure>", ok=False, message="pytree structures differ"))
    return rows


def linear_cases(smoke):
    """(name, kwargs) mirroring tests/pallas_kernels/test_linear_memory_kernels.py, plus, on
    a GPU, the head sizes the kernel is timed at (Triton spills registers there, if at all)."""
    cases = [(f"{rule} T37 segments f32", dict(rule=rule, length=37)) for rule in LINEAR_RULES]
    cases.append(("gated_delta_rule T37 segments bf16", dict(length=37, bfloat16=True)))
    if smoke:
        return cases
    cases += [
        ("gated_delta_rule T11 chunk16 f32", dict(length=11, segments=False)),
        ("gated_delta_rule T64 chunk32 f32", dict(length=64, chunk=32, segments=False)),
        ("gated_delta_rule T64 chunk64 strong decay f32", dict(length=64, chunk=64,
                                                               segments=False, strong=True)),
    ]  # fmt: skip
    for dim in (64, 128):
        for bf16 in (False, True):
            name = f"gated_delta_rule D{dim} T200 chunk64 segments {'bf16' if bf16 else 'f32'}"
            cases.append((name, dict(length=200, chunk=64, dim=dim, bfloat16=bf16)))
    return cases


def run_linear_case(rule="gated_delta_rule", length=37, chunk=16, dim=16, segments=True,
                    bfloat16=False, strong=False, *, smoke, cpu):  # fmt: skip
    from tests.pallas_kernels import test_linear_memory as base
    from tests.pallas_kernels import test_linear_memory_kernels as tests

    def inputs(dtype):
        x = tests.make_inputs(seed=length, length=length, dtype=dtype, dim=dim)
        if strong:
            decays = -np.random.default_rng(9).uniform(0, 40, x["g"].shape)
            x["g"] = jnp.asarray(decays, jnp.float32)
        options = dict(chunk_size=chunk)
        if segments:
            options["segment_ids"] = tests.packed_segment_ids(length)
        return x, options

    dtype = jnp.bfloat16 if bfloat16 else jnp.float32
    with jax.default_device(cpu):  # the oracle: chunked XLA in float32 on the CPU device,
        x, options = inputs(dtype)  # on the same (bf16-rounded) values the kernel sees
        x = {name: a.astype(jnp.float32) for name, a in x.items()}
        expected = base.outputs_and_gradients(rule, x, impl="chunked", **options)
    x, options = inputs(dtype)
    actual = base.outputs_and_gradients(rule, x, impl="pallas_gpu", interpret=smoke, **options)
    tol = tests.BF16_TOL if bfloat16 else tests.F32_TOL
    named = [dict(o=o, final_state=state, d=grads) for o, state, grads in (actual, expected)]
    return compare(*named, tol, base.assert_close), tol


def neural_cases(smoke):
    """(name, kwargs) mirroring tests/pallas_kernels/test_neural_memory_kernels.py."""
    cases = [
        ("titans B2 H2 T37 D32 chunk16 f32", dict(case="shared")),
        ("titans T11 D16 chunk16 bf16", dict(case="bf16")),
    ]
    if smoke:
        return cases
    return cases + [
        ("titans T29 D16 strong decay, eta=0 f32", dict(case="strong")),
        ("titans B2 H2 T100 D64 chunk32 f32 (beyond auto's D <= 32)", dict(case="d64")),
    ]


def run_neural_case(case, *, smoke, cpu):
    from tests.pallas_kernels import test_neural_memory_kernels as tests

    chosen = {
        "shared": tests.SHARED_CASES["B2-H2-T37-D32"],
        "bf16": tests.BF16_CASE,
        "strong": tests.Case(1, 29, 1, 16, 16, strong_decay=True, seed=5),
        "d64": tests.Case(2, 100, 2, 64, 32, seed=8),
    }[case]
    with jax.default_device(cpu):
        inputs = chosen.inputs()
        inputs = tuple(x.astype(jnp.float32) for x in inputs[:3]) + inputs[3:]
        expected = tests.value_and_vjp(tests.chunked_fn(chosen.spec, chosen.chunk), inputs)
    run = tests.kernel_fn(chosen.spec, chosen.chunk, "gpu", interpret=smoke)
    actual = tests.value_and_vjp(run, chosen.inputs())
    tol = tests.BF16_TOL if chosen.bfloat16 else tests.F32_TOL
    named = [dict(o=o, final_state=state, d=dict(zip(tests.INPUT_NAMES, grads)))
             for (o, state), grads in (actual, expected)]  # fmt: skip
    from tests.pallas_kernels.test_linear_memory import assert_close  # also checks finiteness

    return compare(*named, tol, assert_close), tol


def selected(label, cases):
    """Whether a case runs under `--cases` (None: all; else any of the substrings)."""
    return cases is None or any(part in label for part in cases)


def correctness(results, save, smoke, deadline, cases=None):
    cpu = jax.devices("cpu")[0]
    work = [("linear_memory", name, run_linear_case, kw) for name, kw in linear_cases(smoke)]
    work += [("neural_memory", name, run_neural_case, kw) for name, kw in neural_cases(smoke)]
    for family, name, run, kwargs in work:
        if not selected(name, cases):
            continue
        row = dict(family=family, case=name)
        if time.monotonic() > deadline:
            results["correctness"].append(dict(row, status="skipped", seconds=0,
                                               error="time budget spent"))  # fmt: skip
            continue
        print(f"device_check: correctness {family} {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            arrays, tol = run(**kwargs, smoke=smoke, cpu=cpu)
            row.update(status="pass" if all(a["ok"] for a in arrays) else "fail", tol=tol,
                       arrays=arrays)  # fmt: skip
        except Exception as error:  # noqa: BLE001  (a compiler error must not hide the rest)
            row.update(status="error", error=short_error(error))
        row["seconds"] = round(time.perf_counter() - start, 2)
        results["correctness"].append(row)
        save()


# ----------------------------------------------------------------------------- timing


def median_ms(call, sync, repeats):
    """(first call s, compile included; median of `repeats` later calls in ms)."""
    start = time.perf_counter()
    sync(call())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return first, 1e3 * statistics.median(times)


def timing_cases(smoke):
    """Interleaved so that a budget cut leaves every family its shortest lengths."""
    if smoke:
        return [dict(family="linear_memory", rule="linear_attention", batch=1, length=64,
                     heads=1, dim=16, dtype="float32"),
                dict(family="neural_memory", rule="titans", batch=1, length=32, heads=1, dim=16,
                     dtype="float32")]  # fmt: skip
    cases = []
    big = dict(batch=8, heads=16)
    for length in (4096, 8192, 16384):
        for dtype in ("bfloat16", "float32"):
            for dim in (128, 64):
                cases.append(dict(family="linear_memory", rule="gated_delta_rule",
                                  length=length, dim=dim, dtype=dtype, **big))  # fmt: skip
            for dim in (32, 16) if length == 4096 else (32,):
                cases.append(dict(family="neural_memory", rule="titans", length=length,
                                  dim=dim, dtype=dtype, **big))  # fmt: skip
    for rule in LINEAR_RULES[:3]:
        cases.append(dict(family="linear_memory", rule=rule, length=8192, dim=128,
                          dtype="bfloat16", **big))  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        cases.append(dict(family="linear_memory", rule="gated_delta_rule", length=32768,
                          dim=128, dtype=dtype, **big))  # fmt: skip
    return cases


def jax_sync(x):
    return jax.block_until_ready(x)


def linear_impls(case, smoke):
    """{impl: (forward, forward+backward, sync)} for one timing case; a missing comparison
    library is an entry (None, reason)."""
    from benchmarks import kernels

    rule, chunk = case["rule"], 64
    inputs = kernels.make_inputs(case["batch"], case["length"], case["heads"], case["dim"],
                                 jnp.dtype(case["dtype"]))  # fmt: skip
    impls = {}
    for impl in ("pallas_gpu", "chunked"):
        fns = kernels.make_functions(rule, impl, chunk, interpret=smoke and impl != "chunked")
        impls[impl] = tuple(lambda fn=fn: fn(inputs) for fn in fns) + (jax_sync,)
    impls["jla"] = (None, "cpu-smoke") if smoke else jla_functions(rule, inputs)
    impls["fla"] = (None, "cpu-smoke") if smoke else fla_functions(rule, inputs)
    return impls


def jla_functions(rule, inputs):
    if rule not in JLA_KINDS:
        return None, f"jla has no {rule} kind"
    try:
        import jla.ops
    except ImportError as error:
        return None, f"jla not importable: {short_error(error, 300)}"
    takes_g, takes_beta = rule in ("simple_gla", "gated_delta_rule"), "delta" in rule

    def forward(x):
        gates = dict(g=x["g"]) if takes_g else {}
        gates.update(dict(beta=x["beta"].astype(x["q"].dtype)) if takes_beta else {})
        return jla.ops.linear_attention(
            JLA_KINDS[rule], x["q"], x["k"], x["v"], impl="mosaic_gpu", **gates,
            initial_state=x["initial_state"], output_final_state=True,
        )  # fmt: skip

    def loss(x):
        o, final_state = forward(x)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final_state.astype(jnp.float32) ** 2)

    fns = (jax.jit(forward), jax.jit(jax.grad(loss)))
    return tuple(lambda fn=fn: fn(inputs) for fn in fns) + (jax_sync,)


def fla_functions(rule, inputs):
    try:
        import importlib

        import torch

        op = getattr(importlib.import_module(FLA_OPS[rule][0]), FLA_OPS[rule][1])
    except Exception as error:  # noqa: BLE001  (ImportError, or a Triton / CUDA init error)
        return None, f"fla not importable: {short_error(error, 300)}"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[str(inputs["q"].dtype)]

    def tensor(x, dtype):
        return torch.tensor(np.asarray(x.astype(jnp.float32)), device="cuda").to(dtype)

    x = {n: tensor(a, dtype if n in ("q", "k", "v") else torch.float32) for n, a in inputs.items()}
    x["beta"] = x["beta"].to(dtype)
    gates = {"linear_attention": (), "simple_gla": ("g",), "delta_rule": ("beta",),
             "gated_delta_rule": ("g", "beta")}[rule]  # fmt: skip
    extra = {"normalize": False} if rule == "linear_attention" else {}

    def forward(x):
        return op(x["q"], x["k"], x["v"], *(x[n] for n in gates), initial_state=x["initial_state"],
                  output_final_state=True, **extra)  # fmt: skip

    def forward_backward():
        leaves = {n: a.detach().requires_grad_(True) for n, a in x.items()}
        o, final_state = forward(leaves)
        loss = (o.float() ** 2).sum() + (final_state.float() ** 2).sum()
        loss.backward()
        return [a.grad for a in leaves.values()]

    def sync(_):
        torch.cuda.synchronize()

    def run_forward():
        with torch.no_grad():
            return forward(x)

    return run_forward, forward_backward, sync


def neural_impls(case, smoke):
    from benchmarks import neural_memory_kernels as bench
    from pallas_kernels.neural_memory.choices import MemorySpec

    spec = MemorySpec()
    inputs = bench.make_inputs(spec, case["batch"], case["length"], case["heads"], case["dim"],
                               jnp.dtype(case["dtype"]))  # fmt: skip
    impls = {}
    for impl, name in (("gpu", "pallas_gpu"), ("chunked", "chunked")):
        fns = bench.make_functions(spec, impl, 16, interpret=smoke)
        impls[name] = tuple(lambda fn=fn: fn(*inputs) for fn in fns) + (jax_sync,)
    return impls


def timing(results, save, smoke, deadline, repeats, cases=None):
    for case in timing_cases(smoke):
        label = " ".join(f"{k}={v}" for k, v in case.items())
        if not selected(label, cases):
            continue
        row = dict(case, times_ms={}, first_call_s={}, notes={})
        results["timing"].append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "time budget spent"
            save()
            continue
        print(f"device_check: timing {label}", file=sys.stderr, flush=True)
        make = linear_impls if case["family"] == "linear_memory" else neural_impls
        try:
            impls = make(case, smoke)
        except Exception as error:  # noqa: BLE001
            row["error"] = short_error(error)
            save()
            continue
        for impl, functions in impls.items():
            if functions[0] is None:
                row["notes"][impl] = functions[1]
                continue
            *calls, sync = functions
            for mode, call in zip(MODES, calls):
                key = f"{impl} {mode}"
                if time.monotonic() > deadline:
                    row["notes"][key] = "time budget spent"
                    continue
                try:
                    row["first_call_s"][key], row["times_ms"][key] = median_ms(call, sync, repeats)
                except Exception as error:  # noqa: BLE001
                    row["notes"][key] = short_error(error)
        save()


# ----------------------------------------------------------------------------- driver


def default_out():
    out = os.environ.get("OUT")
    folder = pathlib.Path(out) if out else pathlib.Path(__file__).parent / "results"
    return folder / "device_check.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, interpret mode")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results JSON path")
    parser.add_argument("--budget_s", type=float, default=420.0, help="skip cases after this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument(
        "--cases",
        type=lambda s: s.split(","),
        default=None,
        help="run only the cases whose name (correctness) or key=value line (timing) "
        "contains one of these comma-separated substrings, e.g. 'gated_delta_rule,titans'",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    found = versions()
    print("device_check: " + ", ".join(f"{k} {v}" for k, v in found.items() if v), flush=True)
    devices = jax.devices()
    print(f"device_check: jax.devices() = {devices}", flush=True)
    if not args.cpu_smoke and not any(d.platform == "gpu" for d in devices):
        print(f"device_check: no GPU visible to jax (devices: {devices})", file=sys.stderr)
        return 2
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = dict(
        meta=dict(
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            mode="cpu-smoke (interpret mode)" if args.cpu_smoke else "gpu",
            devices=[f"{d.platform}:{d.device_kind}" for d in devices],
            machine=f"{host.node()} ({host.machine()}, {os.cpu_count()} CPUs)",
            command="python -m benchmarks.device_check " + " ".join(sys.argv[1:]),
            versions=found,
            budget_s=args.budget_s,
            repeats=args.repeats,
        ),  # fmt: skip
        correctness=[],
        timing=[],
    )

    def save():
        results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(report.markdown(results))

    deadline = start + args.budget_s
    correctness(results, save, args.cpu_smoke, deadline, args.cases)
    if not args.skip_timing:
        repeats = 1 if args.cpu_smoke else args.repeats
        timing(results, save, args.cpu_smoke, deadline, repeats, args.cases)
    save()
    print(report.markdown(results), flush=True)
    print(f"device_check: wrote {out} and {out.with_suffix('.md')}", flush=True)
    failed = [row["case"] for row in results["correctness"] if row["status"] in ("fail", "error")]
    if failed:
        print(f"device_check: {len(failed)} correctness case(s) did not pass: {failed}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
