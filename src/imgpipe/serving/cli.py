"""The `imgpipe` command (also `python -m imgpipe`): one subcommand per use of the pipeline's results.

    imgpipe predict results/digits/models/cnn photos/ 'more/*.jpg' -o predictions.csv

Exit status: 0 when every input was predicted, 1 when any input failed (it is listed in
the output with the reason), 2 for a usage error (a missing model directory, a bad option).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

EXIT_OK, EXIT_INPUT_FAILED, EXIT_USAGE, EXIT_CRASHED = 0, 1, 2, 3

log = logging.getLogger("imgpipe.serving.cli")


class UsageError(Exception):
    """A mistake in the command line; the message names the argument."""


class ProgressBar:
    """`predict  120/500 images [=====     ]` on stderr, redrawn in place; only on a terminal."""

    WIDTH = 30

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.started = time.perf_counter()

    def __call__(self, done: int) -> None:
        filled = self.WIDTH * done // max(self.total, 1)
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        self.stream.write(f"\rpredict {done:>{len(str(self.total))}}/{self.total} images "
                          f"[{'=' * filled}{' ' * (self.WIDTH - filled)}] {rate:.0f}/s")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description="Use what the imgpipe pipeline produced.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict", help="classify images with a trained model",
        description="Classify images with a trained model directory (results/<experiment>/models/<model>/), "
                    "preprocessed exactly as the model was trained. Exit status 0: all predicted; 1: some inputs "
                    "failed (listed with the reason); 2: usage error.")
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="a trained model's folder (holds model.pt)")
    predict.add_argument("inputs", metavar="INPUT", nargs="+",
                         help="image files, folders (searched recursively) or glob patterns (quote them)")
    predict.add_argument("-o", "--output", metavar="OUT", default=None,
                         help="write predictions to OUT.json or OUT.csv (by suffix); default: JSON on stdout")
    predict.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                         help="how many best classes to list per image (default: 3, or all classes if fewer)")
    predict.add_argument("--batch-size", type=positive_int, default=64, metavar="B",
                         help="images decoded and predicted at a time (default: 64)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="auto: a GPU when present, else the CPU")
    predict.set_defaults(run=run_predict)
    return parser


def run_predict(args: argparse.Namespace) -> int:
    # torch: `imgpipe --help` and a mistyped argument answer without importing it
    from imgpipe.models.checkpoints import CheckpointError
    from imgpipe.serving.predict import (
        OUTPUT_FORMATS,
        ModelDirError,
        load_classifier,
        predict_inputs,
        resolve_top_k,
        write_predictions,
    )

    if args.output is not None and not args.output.lower().endswith(OUTPUT_FORMATS):
        raise UsageError(f"-o/--output '{args.output}' must end in .json or .csv")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here; use --device auto or cpu")
    try:
        classifier = load_classifier(args.model_dir, args.device)
    except (ModelDirError, CheckpointError) as error:
        raise UsageError(f"MODEL_DIR: {error}") from None
    try:
        top_k = resolve_top_k(args.top_k, classifier.classes)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    show_progress = (lambda total: ProgressBar(total) if total else None) if sys.stderr.isatty() else None
    predictions = predict_inputs(classifier, args.inputs, args.batch_size, on_start=show_progress)
    write_predictions(classifier, predictions, top_k, args.output, stdout=sys.stdout)
    if args.output:
        log.info("written to %s", args.output)
    return EXIT_INPUT_FAILED if predictions.failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="imgpipe: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 on malformed arguments
    try:
        return args.run(args)
    except UsageError as error:
        parser.exit(EXIT_USAGE, f"imgpipe {args.command}: error: {error}\n")
    except Exception as error:  # noqa: BLE001 - an unforeseen error must not read as "some inputs failed"
        log.exception("failed: %s", error)
        return EXIT_CRASHED

