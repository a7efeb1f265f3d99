"""The run config, the one reader of the workflow config: typed sections, defaults in one place, rules that read RUN."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from quantbench.checkpoint.preflight import GIB, Headroom
from quantbench.evaluate.backend import Backend
from quantbench.quant.schemes import parse_scheme
from quantbench.run.config import CompareConfig, DocsConfig, QuantizationConfig, load_run_config, preflight_of
from quantbench.run.sizing import Hardware
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text(encoding="utf-8"))


def test_sections_hold_the_config_values_and_their_defaults():
    demo = load_run_config(_config("config"), base_dir=REPO)
    assert demo.quantization == QuantizationConfig(device="cpu", seed=0)
    assert demo.evaluation.backend == Backend(name="hf", device="cpu", dtype="auto", batch_size=8, threads=1)
    assert demo.evaluation.data_dir == REPO / "resources" / "data"
    assert (demo.evaluation.limit_of("CEVAL"), demo.evaluation.limit_of("WIKITEXT2")) == (5, 20)
    assert demo.evaluation.overrides_of("GSM8K") == {"max_gen_toks": 32}
    gsm8k = demo.benchmark("GSM8K")  # the spec with this run's overrides, the file's spec left as it is
    assert (gsm8k.lm_eval.generation, gsm8k.overrides, demo.benchmarks["GSM8K"].overrides) == (
        {"max_gen_toks": 32},
        {"max_gen_toks": 32},
        {},
    )
    assert (demo.hardware, demo.preflight.headroom, demo.compare, demo.docs) == (Hardware(), Headroom(), None, None)
    assert demo.benchmarks_file == REPO / "config" / "benchmarks.yaml"
    seed = load_run_config(_config("seed"), base_dir=REPO)
    assert seed.compare == CompareConfig(
        REPO / "resources/published/seed_tables.csv", 1.0, REPO / "resources/published/angelslim-recipe.yaml"
    )
    assert seed.docs.path == REPO / "docs" / "quantization-benchmark.md" and isinstance(seed.docs, DocsConfig)
    assert seed.quantization == QuantizationConfig(device="cuda") and seed.evaluation.limit_of("MMLU") is None


def test_the_backend_param_is_what_the_config_sets():
    """Only the keys the config gives are the evaluate jobs' param (a Backend default is none: results made
    before a default changes stay current); vLLM adds the job's tensor-parallel size."""
    demo = load_run_config(_config("config"), base_dir=REPO).evaluation
    assert demo.backend_params(0) == _config("config")["evaluation"]["backend"]
    vllm = load_run_config(_config("seed"), base_dir=REPO).evaluation
    assert vllm.backend_params(4) == {"name": "vllm", "device": "cuda", "dtype": "auto", "tensor_parallel_size": 4}
    assert vllm.backend_params(0)["tensor_parallel_size"] == 1  # a CPU job runs vLLM's CPU build unsplit


def test_preflight_headroom_reads_the_schema_keys():
    assert preflight_of({"preflight": {"disk_headroom_gb": 1.5, "memory_headroom_gb": 2}}).headroom == Headroom(
        disk_bytes=int(1.5 * GIB), memory_bytes=2 * GIB
    )
    assert preflight_of({}).headroom == Headroom()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["evaluation"]["backend"].update(name="tgi"), r"unknown backend 'tgi'"),
        (lambda c: c["evaluation"].update(source="s3"), r"evaluation.source: 's3' is not one of local, hub"),
        (lambda c: c.update(hardware={"gpu_mem_gb": 4}), r"hardware: gpu_mem_gb must exceed"),
        (
            lambda c: c.update(quantization={"device": "cpu", "threads": 4}),
            r"quantization: unknown key\(s\) \['threads'\]",
        ),
    ],
    ids=["backend", "source", "hardware", "unknown-key"],
)
def test_a_bad_section_fails_at_load_naming_it(edit, message):
    config = copy.deepcopy(_config("config"))
    edit(config)
    with pytest.raises(QuantbenchError, match=message):
        load_run_config(config, base_dir=REPO)


def test_the_schema_sets_no_default():
    """Snakemake's validation fills the schema's defaults into the config; with none there, every default is
    the run config's, and the validated config is the file as written."""
    for name in ("config", "seed", "vllm-cpu"):
        config = _config(name)
        validate(config, str(SCHEMA))
        assert config == _config(name)


def test_rules_read_the_config_only_through_the_run_config():
    raw = re.compile(r"\bconfig\s*(\[|\.get\b|\))|\bin config\b")
    for path in sorted((REPO / "rules").glob("*.smk")):
        code = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
        offending = [line for line in code if raw.search(line) and "load_run_config(config" not in line]
        assert offending == [], f"{path.name} reads the raw config"


def test_a_scheme_refuses_the_parameters_of_another_algorithm():
    weights = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 128}
    assert (
        parse_scheme("G", {"weights": weights, "algorithm": "gptq", "gptq": {"dampening": 0.1}}).params.dampening == 0.1
    )
    with pytest.raises(
        QuantbenchError, match=r"scheme 'R'\.awq: parameters of algorithm awq, but the scheme's algorithm is rtn"
    ):
        parse_scheme("R", {"weights": weights, "awq": {"grid_size": 10}})
