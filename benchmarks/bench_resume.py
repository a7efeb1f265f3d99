"""Per-layer resume on a GPU (issue 18): what saving every layer costs, and whether a killed run resumes to the
same bytes there.

On a random-init model of a real architecture (``bench_quantize.build_model``: a config of
``benchmarks/configs`` cut to ``--layers`` layers) written as a bf16 checkpoint, with random calibration
tokens, each scheme runs ``quantize_checkpoint`` in four worker processes:

1. ``resume=False``: the time without any saving;
2. ``resume=True``, uninterrupted: the time with every layer saved (in the background), its bytes;
3. ``resume=True``, killed by SIGKILL once layer ``--kill-after`` is saved;
4. ``resume=True`` again: it restores and replays the saved layers and quantizes the rest; its time, whether
   its log reports replayed activations that differ from the first run's (checksums), and its bytes.

Runs 1, 2 and 4 must write the same bytes. Writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One quantize_checkpoint run; prints its wall seconds as the last stdout line."""
    import logging

    import torch

    from quantbench.quant import resume
    from quantbench.quant.quantize import quantize_checkpoint
    from quantbench.quant.schemes import load_schemes

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kill_after is not None:
        save = resume.LayerProgress.save

        def save_then_die(progress, stack_path, index, *rest):  # noqa: ANN001 - the method's own arguments
            save(progress, stack_path, index, *rest)
            if index == args.kill_after:
                progress.wait()
                os.kill(os.getpid(), signal.SIGKILL)

        resume.LayerProgress.save = save_then_die
    scheme = load_schemes(REPO / "config" / "schemes.yaml")[args.scheme]
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantize_checkpoint(args.model, scheme, args.out, calibration=args.calib, device=device, resume=not args.no_resume)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def run_worker(*argv: str) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    return done.returncode, json.loads(last) if done.returncode == 0 else {}, done.stderr


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--calib", type=Path)
    parser.add_argument("--scheme", default="INT4-GPTQ")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--config", type=Path, help="Hub-style config.json of the architecture")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--schemes", default="INT4-GPTQ,FP8-Static")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from transformers import AutoTokenizer

    from bench_quantize import TOKENIZER_DIR, build_model, environment, load_config, random_calibration
    from quantbench.calibration.samples import save_calibration

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    config = load_config(args.config, args.layers)
    model_dir, calib = work / "bf16", work / "calib.safetensors"
    model = build_model(config, args.seed)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(model_dir)
    del model
    save_calibration(random_calibration(config.vocab_size, args.samples, args.seq_len, args.seed), calib)
    report = {
        "config": args.config.name,
        "layers": args.layers,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "environment": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "schemes": {},
    }
    for name in args.schemes.split(","):
        common = ["--model", str(model_dir), "--calib", str(calib), "--scheme", name]
        kill = args.layers // 2 - 1
        runs = {}
        for label, extra in [
            ("no_resume", ["--no-resume"]),
            ("resume", []),
            ("killed", ["--kill-after", str(kill)]),
            ("resumed", []),
        ]:
            out = work / name / ("killed" if label in ("killed", "resumed") else label)
            code, result, log = run_worker(*common, "--out", str(out), *extra)
            runs[label] = {"returncode": code, **result, "log_tail": log[-1500:]}
            print(f"{name} {label}: rc {code} {result}", flush=True)
        ckpts = {label: files(work / name / label) for label in ("no_resume", "resume", "killed")}
        resumed_log = runs["resumed"]["log_tail"]
        report["schemes"][name] = {
            "kill_after_layer": kill,
            "runs": runs,
            "killed_by_sigkill": runs["killed"]["returncode"] == -signal.SIGKILL,
            "resumed_restored": f"blocks 0-{kill} restored" in resumed_log,
            "replay_mismatch_logged": "differ from the first run's" in resumed_log,
            "saving_overhead_s": runs["resume"]["seconds"] - runs["no_resume"]["seconds"],
            "same_bytes_resume_vs_no_resume": ckpts["resume"] == ckpts["no_resume"],
            "same_bytes_resumed_vs_uninterrupted": ckpts["killed"] == ckpts["resume"],
            "differing_files": sorted(n for n in ckpts["resume"] if ckpts["killed"].get(n) != ckpts["resume"][n]),
        }
        print(json.dumps({k: v for k, v in report["schemes"][name].items() if k != "runs"}), flush=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
