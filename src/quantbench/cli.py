"""The ``quantbench`` command line: one argparse subcommand per pipeline step.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
sets ``handler``, and ``_run_<name>(args) -> int`` does the work through the library. To add a
subcommand, write that pair and list the ``_add_`` function in ``SUBCOMMANDS``. Errors a user can
cause (``QuantbenchError``) print ``error: <message>`` to stderr and exit with status 2.
Handlers import the library lazily, so a light subcommand never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from quantbench import __version__
from quantbench.calibration.stream import FORMATS, PADDINGS, SELECTIONS, StreamSpec
from quantbench.util.errors import QuantbenchError


def _add_tabulate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tabulate",
        help="render eval-rst, CSV and Markdown tables from a long-format results CSV",
        description="Write <table>.rst, <table>.csv and <table>.md for every table of a CSV with the "
        "columns table, model, scheme, benchmark, value ('-' = missing). Tables, models, schemes and "
        "benchmarks keep their first-seen order.",
    )
    parser.add_argument("--from-csv", type=Path, required=True, metavar="FILE", help="long-format results CSV")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the table files")
    parser.set_defaults(handler=_run_tabulate)


def _run_tabulate(args: argparse.Namespace) -> int:
    from quantbench.report.tables import load_long_csv, write_tables

    for path in write_tables(load_long_csv(args.from_csv), args.out):
        print(path)
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score one model directory on one benchmark and write its result JSON",
        description="Score a checkpoint on one benchmark of the benchmarks file through lm-eval (or WikiText-2 "
        "perplexity) and write one result JSON, atomically. Offline by default: --source local reads the JSONL "
        "files under --data-dir.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory")
    parser.add_argument("--benchmark", required=True, metavar="NAME", help="benchmark name, e.g. MMLU")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="result JSON to write")
    parser.add_argument("--benchmarks", type=Path, default=Path("config/benchmarks.yaml"), metavar="FILE")
    parser.add_argument("--source", choices=("local", "hub"), default="local", help="data source (default local)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("resources/data"),
        metavar="DIR",
        help="folder of the local JSONL files (default resources/data, the demo subsets)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="score the first N items of each lm-eval task "
        "(per subject for grouped benchmarks; perplexity: the first N windows; VLM: the first N records)",
    )
    parser.add_argument("--max-gen-toks", type=int, metavar="N", help="override max_gen_toks (generative benchmarks)")
    parser.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="override max_new_tokens (vision-language benchmarks)"
    )
    parser.add_argument("--seq-len", type=int, metavar="N", help="override the perplexity window length")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="override the perplexity token budget")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--device", default="cpu", help="torch device for the hf backend (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 otherwise), float32, bfloat16")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="hf backend batch size")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (hf backend)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="vllm backend")
    parser.add_argument("--model-name", metavar="NAME", help="model name recorded in the result (default: DIR's name)")
    parser.add_argument("--scheme", metavar="NAME", help="scheme name recorded in the result")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from quantbench.evaluate.backend import Backend
    from quantbench.evaluate.benchmarks import get_benchmark, load_benchmarks
    from quantbench.evaluate.runner import evaluate_benchmark

    spec = get_benchmark(load_benchmarks(args.benchmarks), args.benchmark)
    overrides = {
        "max_gen_toks": args.max_gen_toks,
        "seq_len": args.seq_len,
        "max_tokens": args.max_tokens,
        "max_new_tokens": args.max_new_tokens,
    }
    spec = spec.with_overrides({key: value for key, value in overrides.items() if value is not None})
    backend = Backend(
        name=args.backend,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        threads=args.threads,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    result = evaluate_benchmark(
        args.model,
        spec,
        out_path=args.out,
        model_name=args.model_name or args.model.resolve().name,
        scheme_name=args.scheme,
        source=args.source,
        data_dir=args.data_dir,
        backend=backend,
        limit=args.limit,
        benchmarks_file=args.benchmarks,
    )
    print(f"{result['benchmark']}: {result['score']:.2f} ({result['metric']}, {result['items']} items) -> {args.out}")
    return 0


def _add_calibration_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=128, metavar="N", help="calibration samples (default 128)")
    parser.add_argument(
        "--max-seq-len", type=int, default=2048, metavar="L", help="tokens per sample at most (default 2048)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample selection (default 0)")
    parser.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="shuffle",
        help="records in a seeded shuffle, or the first N in file order (the published recipe's)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="quantbench",
        help="quantbench: whole chats, no generation "
        "prompt; angelslim: the first user/assistant pair with the generation prompt",
    )
    parser.add_argument(
        "--padding",
        choices=PADDINGS,
        default="longest",
        help="longest: pads masked and never counted; "
        "max-length-unmasked / max-length-masked: padded to L, pads counted in the statistics",
    )


def _stream(args: argparse.Namespace) -> StreamSpec:
    return StreamSpec(selection=args.selection, format=args.format, padding=args.padding)


def _add_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="tokenize N calibration samples of a JSONL with a model's tokenizer into one safetensors file",
        description="Choose N records of a JSONL of texts ('text') or chats ('messages' or ShareGPT "
        "'conversations', through the chat template) by a seeded shuffle (or the first N), truncate each to L tokens, and "
        "write input_ids, attention_mask and metadata (source sha256, N, L, tokenizer) atomically. Image-text "
        "records ('image' relative to the JSONL, 'question', 'answer') go through the model's processor and "
        "keep their images' pixel values.",
    )
    parser.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="model directory (its tokenizer is used)"
    )
    parser.add_argument("--data", type=Path, required=True, metavar="JSONL", help="calibration records")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="calibration .safetensors to write")
    _add_calibration_size(parser)
    parser.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from quantbench.calibration.samples import calibrate_model, save_calibration

    calibration = calibrate_model(
        args.model, args.data, args.num_samples, args.max_seq_len, seed=args.seed, stream=_stream(args)
    )
    save_calibration(calibration, args.out)
    print(f"{calibration.num_samples} samples, {calibration.num_tokens} tokens -> {args.out}")
    return 0


def _add_quantize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model directory under a scheme into a compressed-tensors checkpoint",
        description="Load a model, quantize it under a scheme of the schemes file (layer by layer on the "
        "calibration data when the scheme needs data) and write a compressed-tensors checkpoint with its "
        "tokenizer and provenance, atomically.",
    )
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory")
    parser.add_argument("--scheme", required=True, metavar="NAME", help="scheme name, e.g. INT4-GPTQ")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument(
        "--calib",
        type=Path,
        metavar="FILE",
        help="calibration data: a JSONL of records, or a "
        ".safetensors file from `quantbench calibrate` (then the size options are ignored)",
    )
    _add_calibration_size(parser)
    parser.add_argument("--schemes", type=Path, default=Path("config/schemes.yaml"), metavar="FILE")
    parser.add_argument("--device", default="auto", help="compute device for one layer at a time (default auto)")
    parser.add_argument("--chunk-size", type=int, default=8, metavar="N", help="calibration samples per forward call")
    parser.add_argument("--offload-activations", action="store_true", help="keep cached activations in CPU memory")
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="keep no per-layer progress in OUT.partial (a rerun after an interruption starts over)",
    )
    parser.set_defaults(handler=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from quantbench.calibration.samples import calibrate_model
    from quantbench.quant.quantize import quantize_checkpoint
    from quantbench.quant.schemes import get_scheme, load_schemes
    from quantbench.quant.sequential import PipelineOptions

    scheme = get_scheme(load_schemes(args.schemes), args.scheme)
    calibration = args.calib
    if calibration is not None and calibration.suffix != ".safetensors":
        calibration = calibrate_model(
            args.model, calibration, args.num_samples, args.max_seq_len, seed=args.seed, stream=_stream(args)
        )
    options = PipelineOptions(chunk_size=args.chunk_size, offload_activations=args.offload_activations)
    out = quantize_checkpoint(
        args.model,
        scheme,
        args.out,
        calibration=calibration,
        device=args.device,
        seed=args.seed,
        options=options,
        resume=args.resume,
    )
    print(out)
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_tabulate,
    _add_evaluate,
    _add_calibrate,
    _add_quantize,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of ``SUBCOMMANDS`` registered."""
    parser = argparse.ArgumentParser(prog="quantbench", description="Reproduce LLM quantization benchmark tables.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except QuantbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
