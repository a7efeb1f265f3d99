"""config/benchmarks.yaml as data: the published settings, validation, and a run's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantbench.evaluate.benchmarks import get_benchmark, load_benchmarks, parse_benchmark
from quantbench.evaluate.tasks import TEMPLATES_DIR, load_template
from quantbench.util.errors import QuantbenchError

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = load_benchmarks(ROOT / "config" / "benchmarks.yaml")


def test_published_settings() -> None:
    assert list(BENCHMARKS) == [
        "CEVAL",
        "MMLU",
        "GSM8K",
        "HUMANEVAL",
        "WIKITEXT2",
        "MMMU_VAL",
        "DocVQA_VAL",
        "ChartQA_TEST",
        "OlympiadBench",
        "AIME2024",
        "DROP",
        "GPQA-Diamond",
    ]
    lm = {name: spec.lm_eval for name, spec in list(BENCHMARKS.items())[:4]}
    assert {n: (s.hub_task, s.num_fewshot, s.result_key) for n, s in lm.items()} == {
        "CEVAL": ("ceval-valid", 5, "acc,none"),
        "MMLU": ("mmlu", 4, "acc,none"),
        "GSM8K": ("gsm8k", 5, "exact_match,strict-match"),
        "HUMANEVAL": ("humaneval", 0, "pass@1,create_test"),
    }
    assert lm["HUMANEVAL"].scorer == "sandbox" and all(s.generation == {} for s in lm.values())
    # the published text tables: plain prompts, the whole reply scored
    assert not any(s.chat_template or s.think_end_token for s in lm.values())
    ppl = BENCHMARKS["WIKITEXT2"].perplexity
    assert (ppl.seq_len, ppl.max_tokens, BENCHMARKS["WIKITEXT2"].percent) == (2048, None, False)


def test_every_local_task_template_exists_and_mirrors_its_fewshot_count() -> None:
    for spec in BENCHMARKS.values():
        if spec.lm_eval:
            template = load_template(spec.lm_eval.local_task)
            assert template.get("num_fewshot", spec.lm_eval.num_fewshot) == spec.lm_eval.num_fewshot
    assert (TEMPLATES_DIR / "ceval_subjects.yaml").is_file()


def test_overrides_change_a_copy_and_are_recorded() -> None:
    gsm8k = BENCHMARKS["GSM8K"]
    quick = gsm8k.with_overrides({"max_gen_toks": 32})
    assert quick.lm_eval.generation == {"max_gen_toks": 32} and quick.overrides == {"max_gen_toks": 32}
    assert gsm8k.lm_eval.generation == {} and gsm8k.overrides == {}
    ppl = BENCHMARKS["WIKITEXT2"].with_overrides({"seq_len": 512, "max_tokens": 8192})
    assert (ppl.perplexity.seq_len, ppl.perplexity.max_tokens) == (512, 8192)
    assert ppl.to_dict()["perplexity"]["hub"] == {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("CEVAL", {"seq_len": 512}, "applies to perplexity benchmarks only"),
        ("WIKITEXT2", {"max_gen_toks": 8}, "applies to lm_eval benchmarks only"),
        ("GSM8K", {"temperature": 1}, "is unknown"),
        ("GSM8K", {"max_gen_toks": 0}, "must be a positive integer"),
        ("WIKITEXT2", {"seq_len": 512, "max_tokens": 100}, "must be >= seq_len"),
    ],
)
def test_bad_overrides_are_clear_errors(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(QuantbenchError, match=message):
        BENCHMARKS[name].with_overrides(overrides)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"files": {"test": "x.jsonl"}}, "exactly one of 'lm_eval' or 'perplexity'"),
        ({"lm_eval": {"hub_task": "t", "local_task": "t", "num_fewshot": 0, "metric": "acc"}}, "files"),
        ({"files": {"test": "x"}, "perplexity": {"seq_len": 8, "stride": 4}}, r"unknown key\(s\) \['stride'\]"),
        (
            {
                "files": {"test": "x"},
                "lm_eval": {"hub_task": "t", "local_task": "t", "num_fewshot": 0, "metric": "acc", "scorer": "exec"},
            },
            "scorer must be one of",
        ),
        (
            {"files": {"test": "x"}, "lm_eval": {"local_task": "t", "num_fewshot": 0, "metric": "acc"}},
            "exactly one of hub_task .* or hub_data",
        ),
        (
            {
                "files": {"test": "x"},
                "lm_eval": {
                    "hub_task": "t",
                    "hub_data": {"test": {"path": "p"}},
                    "local_task": "t",
                    "num_fewshot": 0,
                    "metric": "acc",
                },
            },
            "exactly one of hub_task",
        ),
        (
            {
                "files": {"a": "x", "b": "y"},
                "lm_eval": {"hub_data": {"a": {"path": "p"}}, "local_task": "t", "num_fewshot": 0, "metric": "acc"},
            },
            r"hub_data: give the Hub files of exactly the splits of files \(\['a', 'b'\]\), got \['a'\]",
        ),
    ],
)
def test_invalid_benchmark_entries_name_the_benchmark(raw: dict, message: str) -> None:
    with pytest.raises(QuantbenchError, match=message) as info:
        parse_benchmark("BENCH", raw)
    assert "BENCH" in str(info.value)


def test_unknown_benchmark_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuantbenchError, match="known benchmarks: CEVAL, MMLU"):
        get_benchmark(BENCHMARKS, "ARC")
    with pytest.raises(QuantbenchError, match="does not exist"):
        load_benchmarks(tmp_path / "nope.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"tasks": {}}))
    with pytest.raises(QuantbenchError, match="top-level 'benchmarks:'"):
        load_benchmarks(tmp_path / "b.yaml")


def test_spec_survives_the_params_round_trip():
    from quantbench.evaluate.benchmarks import benchmark_from_dict

    for spec in BENCHMARKS.values():
        if spec.lm_eval is not None:
            spec = spec.with_overrides({"max_gen_toks": 16})
        elif spec.perplexity is not None:
            spec = spec.with_overrides({"seq_len": 256, "max_tokens": 1024})
        assert benchmark_from_dict(spec.to_dict()) == spec
