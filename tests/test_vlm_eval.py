"""Vision-language benchmarks end to end on the tiny Qwen2.5-VL: offline scorer, result JSON, and the Qwen2.5VL table from results."""

from __future__ import annotations

import csv
import json
import random
import shlex
from pathlib import Path

import pytest
import yaml

from quantbench.cli import main
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import benchmark_from_dict, load_benchmarks, parse_benchmark
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.evaluate.vlm_eval import lmms_eval_device, lmms_eval_model, question_prompt
from quantbench.evaluate.vqa_metrics import MMMU_SEED, anls, mmmu_score, relaxed_correctness
from quantbench.quant.quantize import quantize_checkpoint
from quantbench.quant.schemes import load_schemes
from quantbench.report.cells import collect_cells
from quantbench.report.tables import TableSpec, write_tables
from quantbench.util.errors import QuantbenchError
from vlm_fixtures import save_tiny_vlm, write_benchmark_fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = load_benchmarks(REPO / "config" / "benchmarks.yaml")
VLM = ("MMMU_VAL", "DocVQA_VAL", "ChartQA_TEST")
TABLE = "table-qwen2.5vl-performance"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vlm_eval")
    model_dir = save_tiny_vlm(root / "model")
    write_benchmark_fixtures(root / "data")
    quantized = quantize_checkpoint(
        model_dir, load_schemes(REPO / "config" / "schemes.yaml")["INT8-Dynamic-ViT"], root / "int8vit", device="cpu"
    )
    return {"root": root, "model": model_dir, "quantized": quantized, "data": root / "data"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", VLM)
def test_offline_scorer_writes_the_text_benchmarks_result_format(name: str, setup: dict) -> None:
    spec = BENCHMARKS[name].with_overrides({"max_new_tokens": 4})
    out = setup["root"] / "evals" / f"{name}.json"
    result = evaluate_benchmark(
        setup["quantized"],
        spec,
        out_path=out,
        model_name="tiny-vl",
        scheme_name="INT8-Dynamic-ViT",
        data_dir=setup["data"],
    )
    assert json.loads(out.read_text(encoding="utf-8")) == result
    records = _records(setup["data"] / spec.files[spec.lmms_eval.split])
    answers = result["details"]["answers"]
    assert result["items"] == len(records) == len(answers) == {"MMMU_VAL": 4, "DocVQA_VAL": 3, "ChartQA_TEST": 4}[name]
    assert (
        result["metric"] == spec.lmms_eval.metric
        and result["unit"] == "percent"
        and result["scheme"] == "INT8-Dynamic-ViT"
    )
    assert result["data"]["source"] == "local" and result["spec"]["overrides"] == {"max_new_tokens": 4}
    # the score is the metric over the recorded answers, recomputed here from the records' own fields
    rng = random.Random(MMMU_SEED)
    if name == "DocVQA_VAL":
        expected = [anls(a, r["answers"]) for a, r in zip(answers, records)]
    elif name == "ChartQA_TEST":
        expected = [float(relaxed_correctness(a, r["answer"])) for a, r in zip(answers, records)]
        assert set(result["details"]["by_type"]) == {"human_test", "augmented_test"}
    else:
        expected = [
            float(mmmu_score(r["question_type"], a, r["answer"], r["options"], rng)) for a, r in zip(answers, records)
        ]
    assert result["details"]["scores"] == expected
    assert result["score"] == pytest.approx(100 * sum(expected) / len(expected))
    assert all(isinstance(a, str) for a in answers)


def test_recorded_command_reproduces_the_score(setup: dict) -> None:
    spec = BENCHMARKS["DocVQA_VAL"].with_overrides({"max_new_tokens": 3})
    first = evaluate_benchmark(
        setup["quantized"],
        spec,
        out_path=setup["root"] / "first.json",
        model_name="tiny-vl",
        scheme_name="INT8-Dynamic-ViT",
        data_dir=setup["data"],
        limit=2,
        benchmarks_file=REPO / "config" / "benchmarks.yaml",
    )
    argv = shlex.split(first["command"])[1:]
    argv[argv.index("--out") + 1] = str(setup["root"] / "again.json")
    assert "--max-new-tokens" in argv and main(argv) == 0
    again = json.loads((setup["root"] / "again.json").read_text(encoding="utf-8"))
    assert (
        again["items"] == 2
        and again["details"]["answers"] == first["details"]["answers"]
        and again["score"] == first["score"]
    )


def test_vlm_benchmark_specs_round_trip_and_check_their_split() -> None:
    for name in VLM:
        spec = BENCHMARKS[name].with_overrides({"max_new_tokens": 8})
        assert benchmark_from_dict(spec.to_dict()) == spec and spec.lmms_eval.max_new_tokens == 8
    with pytest.raises(QuantbenchError, match=r"lmms_eval.split: 'val' is not one of the files' splits \['test'\]"):
        parse_benchmark(
            "X",
            {"files": {"test": "x.jsonl"}, "lmms_eval": {"task": "t", "metric": "m", "scorer": "anls", "split": "val"}},
        )
    with pytest.raises(QuantbenchError, match="scorer must be one of"):
        parse_benchmark(
            "X",
            {"files": {"val": "x.jsonl"}, "lmms_eval": {"task": "t", "metric": "m", "scorer": "bleu", "split": "val"}},
        )


def test_prompts_follow_the_lmms_eval_tasks() -> None:
    mc = {
        "question": "<image 1> What colour is the shape?",
        "options": ["red", "green"],
        "question_type": "multiple-choice",
    }
    assert question_prompt(BENCHMARKS["MMMU_VAL"], mc) == (
        "What colour is the shape?\nA. red\nB. green\n\nAnswer with the option's letter from the given choices directly."
    )
    assert question_prompt(BENCHMARKS["MMMU_VAL"], {**mc, "question_type": "open"}) == (
        "What colour is the shape?\n\nAnswer the question using a single word or phrase."
    )
    assert question_prompt(BENCHMARKS["ChartQA_TEST"], {"question": "Which bar is highest?"}) == (
        "Which bar is highest?\nAnswer the question with a single word."
    )


def test_hub_source_needs_lmms_eval(setup: dict) -> None:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lmms-eval is installed here: the hub path would download its datasets")
    out = setup["root"] / "hub.json"
    with pytest.raises(QuantbenchError, match="lmms-eval's task 'chartqa', but lmms-eval is not installed"):
        evaluate_benchmark(setup["model"], BENCHMARKS["ChartQA_TEST"], out_path=out, model_name="tiny-vl", source="hub")
    assert not out.exists()


def test_lmms_eval_gets_our_checkpoint_as_the_published_script_ran_it(setup: dict) -> None:
    """lmms-eval 0.7's vllm model takes the checkpoint as ``model=`` (``pretrained=`` would pass on to vLLM and
    leave its default model, Qwen2.5-VL-3B-Instruct, selected); tensor parallelism from the backend, batch 16 and
    GPU memory utilization 0.9 as deploy/lmms_eval.sh. tests/test_vllm.py builds lmms-eval's model from these."""
    vllm = Backend(name="vllm", device="cuda", tensor_parallel_size=4)
    assert lmms_eval_model(setup["model"], vllm) == (
        "vllm",
        f"model={setup['model']},tensor_parallel_size=4,gpu_memory_utilization=0.9,dtype=auto",
        16,
    )
    assert lmms_eval_device(vllm) is None
    cpu = Backend(name="vllm", device="cpu")
    assert lmms_eval_model(setup["model"], cpu)[1].endswith(
        ",tensor_parallel_size=1,gpu_memory_utilization=0.9,dtype=auto,enforce_eager=True"
    )
    hf = Backend(name="hf", device="cpu")
    assert lmms_eval_model(setup["model"], hf) == ("qwen2_5_vl", f"pretrained={setup['model']}", 1)
    assert lmms_eval_device(hf) == "cpu"


def test_qwen2_5_vl_table_renders_from_result_files(tmp_path: Path) -> None:
    """Result JSONs of the published Qwen2.5VL cells (as the evaluate step writes them) -> the page's grid, cell for cell."""
    with (REPO / "resources" / "published" / "seed_tables.csv").open(encoding="utf-8", newline="") as handle:
        published = [row for row in csv.DictReader(handle) if row["table"] == TABLE]
    seed = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
    table = next(t for t in seed["tables"] if t["name"] == TABLE)
    assert table["benchmarks"] == list(VLM)
    files = []
    for row in published:
        if row["value"] == "-":
            continue
        out = tmp_path / "evals" / row["model"] / row["scheme"] / f"{row['benchmark']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "benchmark": row["benchmark"],
                    "score": float(row["value"]),
                    "unit": "percent",
                    "metric": BENCHMARKS[row["benchmark"]].lmms_eval.metric,
                    "model": row["model"],
                    "scheme": row["scheme"],
                }
            ),
            encoding="utf-8",
        )
        files.append(out)
    rows = tuple((model, scheme) for model in table["models"] for scheme in table["schemes"])
    write_tables(collect_cells(TABLE, files), tmp_path / "tables", [TableSpec(TABLE, rows, tuple(VLM))])
    rst = (tmp_path / "tables" / f"{TABLE}.rst").read_text(encoding="utf-8").splitlines()
    cells = {}
    for line in rst:
        parts = [p.strip() for p in line.split("|")[1:-1]]
        if len(parts) == 5 and parts[1] not in ("Quantization", ""):
            model = parts[0] or model  # noqa: F821 - set by the model's first row
            cells.update({(model, parts[1], bench): value for bench, value in zip(VLM, parts[2:])})
    assert len(cells) == 4 * 7 * 3 == len(published)
    assert all(cells[(r["model"], r["scheme"], r["benchmark"])] == r["value"] for r in published)
    assert "   | Qwen2.5VL-3B      | BF16             | 47.11    | 78.57      | 80.32        |" in rst
    assert "   |                   | INT4-AWQ         | 45.78    | -          | 79.60        |" in rst
