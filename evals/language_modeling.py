"""Language-modelling evals: held-out loss (bits per byte / per token, perplexity) and length
extrapolation (loss by position bucket at multiples of the training length).

Held-out data is the run's own: `data.eval_path`, or the tail of `data.path` that training
never saw. The split point is the one training used (computed with the *training* seq_len),
so longer windows are cut from the same held-out tokens, never from training data; a length
for which the held-out part holds no window is reported as such.

Numbers, per evaluated length L = m * T (T = data.seq_len, m in `multiples`):
  loss            mean next-token cross-entropy, nats/token, over all positions of the first
                  `num_windows * max(multiples) / m` held-out windows of L + 1 tokens: every
                  length scores the same held-out tokens (unless the held-out part is shorter)
  bits_per_token  loss / ln 2; for byte-level text (data.name "text") this is bits per byte
  perplexity      exp(loss)
  bucket_loss     the loss of positions [i T, (i + 1) T) for i = 0 .. m - 1: how the model
                  does beyond the length it was trained on (a flat curve extrapolates)
Every block kind runs at any length (RoPE attention has no maximum position; recurrent
memories are length-free); a length at which the model fails reports its error instead.

    python -m evals.language_modeling --workdir=DIR [--multiples=1,2,4,8] [--num_windows=16]
        [--batch_size=8] [--step=N]

writes DIR/evals/language_modeling_step<N>.json and prints a table.
"""

import math

import numpy as np

from data import pipeline
from data.config import document_eos
from data.windows import Windows
from errors import ConfigError, MnemaxError
from evals import common

DEFAULT_MULTIPLES = (1, 2, 4, 8)


def held_out_span(data_config):
    """(token stream, start, stop) of the held-out tokens of a text/tokens run."""
    if data_config.name not in ("text", "tokens"):
        raise ConfigError(
            f"data.name: language-modelling evals need a text or tokens corpus, not "
            f"{data_config.name!r}"
        )
    return pipeline.corpus_span(data_config, "eval")


def length_losses(model, stream, start, stop, *, seq_len, num_windows, batch_size, eos_id=None):
    """Per-position losses [N, seq_len] of the first N <= num_windows windows of
    stream[start:stop] (DataError if not even one fits). With `eos_id` the windows carry
    segment_ids, so the model resets at document starts as in training."""
    windows = Windows(stream, start, stop, seq_len, "the held-out data", eos_id=eos_id)
    examples = [windows(index) for index in range(min(num_windows, len(windows)))]
    inputs = np.stack([e["inputs"] for e in examples])
    targets = np.stack([e["targets"] for e in examples])
    segment_ids = None if eos_id is None else np.stack([e["segment_ids"] for e in examples])
    losses, _ = common.token_scores(
        model, inputs, targets, batch_size=batch_size, segment_ids=segment_ids
    )
    return losses


def extrapolation(
    model, data_config, *, multiples=DEFAULT_MULTIPLES, num_windows=16, batch_size=8
) -> dict:
    """Held-out loss at each multiple of the training length (module docstring).

    Returns {"unit": "bits_per_byte" | "bits_per_token", "train_seq_len", "lengths":
    [{multiple, seq_len, loss, bits_per_token, perplexity, bucket_loss, num_windows} or
    {multiple, seq_len, error}]}.
    """
    stream, start, stop = held_out_span(data_config)
    train_length = data_config.seq_len
    lengths = []
    for multiple in multiples:
        seq_len = multiple * train_length
        row = {"multiple": multiple, "seq_len": seq_len}
        try:
            losses = length_losses(
                model,
                stream,
                start,
                stop,
                seq_len=seq_len,
                num_windows=num_windows * max(multiples) // multiple,
                batch_size=batch_size,
                eos_id=document_eos(data_config),
            )
        except MnemaxError as error:  # e.g. no held-out window of this length
            lengths.append({**row, "error": str(error)})
            continue
        except Exception as error:  # noqa: BLE001 - a block that cannot run at this length
            lengths.append({**row, "error": f"{type(error).__name__}: {error}".splitlines()[0]})
            continue
        loss = float(losses.mean())
        buckets = losses.reshape(len(losses), multiple, train_length).mean(axis=(0, 2))
        row.update(
            loss=loss,
            bits_per_token=loss / math.log(2),
            perplexity=math.exp(loss),
            bucket_loss=[float(b) for b in buckets],
            num_windows=len(losses),
        )
        lengths.append(row)
    unit = "bits_per_byte" if data_config.name == "text" else "bits_per_token"
    return {"unit": unit, "train_seq_len": train_length, "lengths": lengths}


def parse_args(argv):
    parser = common.ArgumentParser(
        prog="python -m evals.language_modeling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: newest)")
    parser.add_argument("--multiples", type=common.int_list, default=list(DEFAULT_MULTIPLES))
    parser.add_argument(
        "--num_windows", type=int, default=16, help="held-out windows at the longest length"
    )
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    if not args.multiples or min(args.multiples) < 1:
        parser.error(f"--multiples: positive integers, got {args.multiples}")
    if args.num_windows < 1 or args.batch_size < 1:
        parser.error("--num_windows and --batch_size must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    restored = common.restore(args.workdir, args.step)
    result = extrapolation(
        restored.model,
        restored.config.data,
        multiples=args.multiples,
        num_windows=args.num_windows,
        batch_size=args.batch_size,
    )
    result = {"step": restored.step, "workdir": args.workdir, **result}
    path = common.write_results(args.workdir, "language_modeling", result)
    print(f"held-out loss (nats/token) at step {restored.step} ({path}); bucket_loss: by position")
    rows = []
    for row in result["lengths"]:
        shown = dict(row)
        if "bucket_loss" in row:
            shown["bucket_loss"] = " ".join(f"{b:.3f}" for b in row["bucket_loss"])
            shown[result["unit"]] = row["bits_per_token"]
        rows.append(shown)
    columns = ["multiple", "seq_len", "loss", result["unit"], "perplexity", "bucket_loss"]
    print(common.format_table(rows, columns))
    for row in result["lengths"]:
        if "error" in row:
            print(f"  length {row['seq_len']}: {row['error']}")


if __name__ == "__main__":
    import sys

    sys.exit(common.run_cli(main))
