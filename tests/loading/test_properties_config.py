"""Property: whatever config.json says, loading ends in an anyquant error naming config.json, the
field or the tensor that disagrees, or in a model that computes what HF transformers computes from
the same directory.

Each example changes one to three fields of the config.json of a tiny real checkpoint (dense Llama,
tied Qwen3, Qwen3-MoE, DeepSeek-V3, the trained stories260K), or replaces the whole file: sizes set to zero, negative, huge, wrong-typed or off by some; head counts that do not
divide; vocab sizes that disagree with the embedding; rope_scaling junk; unknown architectures;
flags of the wrong type. A load that succeeds is compared with transformers loading the same
directory (the independent reference), where transformers accepts it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from anyquant.utils.tiny_model import write_tiny_model
from anyquant.utils.tiny_moe import write_tiny_moe_model
from tests.loading.properties import (
    TOKENS,
    Outcome,
    assert_names,
    fuzz_settings,
    json_values,
    load_outcome,
    record,
    rel_l2,
    time_limit,
    weighted,
)

transformers = pytest.importorskip("transformers")

TINY = dict(num_hidden_layers=1, hidden_size=32, head_dim=8, intermediate_size=48, vocab_size=259)
# Fields no tiny config has but real ones carry, so they get mutated too.
EXTRA_KEYS = [
    "rope_scaling",
    "rope_parameters",
    "original_max_position_embeddings",
    "partial_rotary_factor",
    "text_config",
    "quantization_config",
    "dtype",
    "mlp_bias",
    "sliding_window",
]
ROPE_TYPES = ["default", "linear", "dynamic", "llama3", "yarn", "longrope", "su", "", "mrope"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense Llama, Qwen3 with tied embeddings, a Qwen3-MoE, a DeepSeek-V3 (MLA, grouped routing,
    YaRN) and the trained stories260K when ../shared is there."""
    from tests.conftest import STORIES
    from tests.models.test_deepseek_vs_transformers import CASES, write_deepseek

    root = tmp_path_factory.mktemp("cfg-bases")
    out = {
        "llama": write_tiny_model(root / "llama", "llama", seed=5, **TINY),
        "qwen3-tied": write_tiny_model(root / "qwen3", "qwen3", seed=5, **TINY, tie_word_embeddings=True),
        "qwen3-moe": write_tiny_moe_model(root / "qwen3-moe", "qwen3_moe", seed=5, num_hidden_layers=2),
        "deepseek-v3": write_deepseek(root / "deepseek-v3", *CASES["v3-yarn"]),
    }
    if (STORIES / "hf" / "config.json").exists():
        out["stories260K"] = STORIES / "hf"
    return out


def near(value: Any) -> st.SearchStrategy[Any]:
    """Values close to a valid one: off by a little, scaled, or the right number in the wrong type."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json_values()
    return st.sampled_from(
        [value + 1, value - 1, value * 2, value // 2, -value, 0, str(value), [value], float(value) + 0.5]
    )


def rope_junk() -> st.SearchStrategy[Any]:
    keys = st.sampled_from(
        [
            "rope_type",
            "type",
            "factor",
            "original_max_position_embeddings",
            "low_freq_factor",
            "high_freq_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "attention_factor",
            "rope_theta",
        ]
    )
    values = st.one_of(st.sampled_from(ROPE_TYPES), json_values(3))
    return st.one_of(json_values(), st.dictionaries(keys, values, max_size=5))


def mutation(config: dict[str, Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    keys = sorted(config) + EXTRA_KEYS
    names = ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GPT2LMHeadModel", "X", ""]
    architectures = st.lists(st.sampled_from(names), max_size=2)
    one = weighted(
        (
            6,
            st.sampled_from(sorted(config)).flatmap(
                lambda k: st.tuples(st.just("set"), st.just(k), near(config[k]))
            ),
        ),
        (2, st.tuples(st.just("set"), st.sampled_from(keys), json_values())),
        (2, st.tuples(st.just("set"), st.sampled_from(["rope_scaling", "rope_parameters"]), rope_junk())),
        (1, st.tuples(st.just("set"), st.just("architectures"), st.one_of(architectures, json_values()))),
        (2, st.tuples(st.just("drop"), st.sampled_from(keys))),
    )
    return weighted(
        (9, st.lists(one, min_size=1, max_size=3).map(tuple)),
        (1, st.tuples(st.tuples(st.just("whole"), json_values()))),
    )


def mutated(config: dict[str, Any], changes: tuple[tuple[Any, ...], ...]) -> Any:
    out: Any = json.loads(json.dumps(config))
    for change in changes:
        if change[0] == "whole":
            out = change[1]
        elif change[0] == "set" and isinstance(out, dict):
            out[change[1]] = change[2]
        elif change[0] == "drop" and isinstance(out, dict):
            out.pop(change[1], None)
    return out


def transformers_logits(path: Path) -> torch.Tensor | None:
    """What transformers computes from the directory, or None when it refuses the config."""
    try:
        with time_limit(30.0):
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            with torch.no_grad():
                return model(torch.tensor([TOKENS])).logits[0].float()
    except Exception:  # transformers' own refusals and crashes: no reference for this config
        return None


def check(base: Path, changes: tuple[tuple[Any, ...], ...]) -> Outcome:
    config = json.loads((base / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="cfg-case-"))
    try:
        case = work / "m"
        shutil.copytree(base, case)
        (case / "config.json").write_text(json.dumps(mutated(config, changes)))
        outcome = load_outcome(case)
        if outcome.error is not None:
            record(f"refused: {type(outcome.error).__name__}: {str(outcome.error)[:70]}")
            fields = [c[1] for c in changes if c[0] in ("set", "drop")]
            # A size that disagrees with the tensors is reported at the tensor, "(from config.json)".
            assert_names(outcome.error, "config.json", *fields)
            return outcome
        reference = transformers_logits(case)
        record("loaded" if reference is not None else "loaded; transformers refuses")
        if reference is not None:
            assert outcome.logits is not None
            err = rel_l2(outcome.logits, reference)
            assert err < 1e-4, f"logits differ from transformers' (rel L2 {err:.2e}) for {changes}"
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


@st.composite
def changes_for_base(draw: st.DrawFn, base: Path) -> tuple[tuple[Any, ...], ...]:
    return draw(mutation(json.loads((base / "config.json").read_text())))


# Cases found by hypothesis or written by hand; each once failed (a bare ValueError / TypeError, or a
# message naming neither config.json nor the field) or guards one check.
@example(name="llama", changes=(("set", "hidden_size", 0),))
@example(name="llama", changes=(("set", "num_attention_heads", 0),))
@example(name="llama", changes=(("set", "num_attention_heads", 3),))
@example(name="llama", changes=(("set", "hidden_size", "32"),))
@example(name="llama", changes=(("set", "vocab_size", 260),))
@example(name="llama", changes=(("set", "rope_scaling", {"rope_type": "llama3", "factor": "x"}),))
@example(name="llama", changes=(("set", "architectures", ["GPT2LMHeadModel"]),))
@example(name="llama", changes=(("whole", [1, 2]),))
@example(name="llama", changes=(("set", "eos_token_id", [float("nan")]),))
@example(name="llama", changes=(("set", "eos_token_id", [None]),))
@example(name="llama", changes=(("set", "architectures", "LlamaForCausalLM"),))
@example(name="qwen3-moe", changes=(("set", "num_experts", "8"),))
@example(name="qwen3-moe", changes=(("set", "mlp_only_layers", [None]),))
@example(name="deepseek-v3", changes=(("set", "kv_lora_rank", 0),))
# Both rope spellings, disagreeing: transformers took rope_scaling, anyquant took rope_parameters (7.7e-2 apart).
@example(name="deepseek-v3", changes=(("set", "rope_scaling", {"": None}),))
@example(name="deepseek-v3", changes=(("set", "rope_parameters", {"rope_type": "yarn", "factor": 0}),))
@given(
    name=st.sampled_from(["llama", "qwen3-tied", "qwen3-moe", "deepseek-v3", "stories260K"]),
    changes=st.data(),
)
@fuzz_settings(max_examples=60)
def test_any_config_mutation_is_refused_clearly_or_matches_transformers(
    bases: dict[str, Path], name: str, changes: Any
) -> None:
    if name not in bases:
        return  # stories260K without ../shared
    if not isinstance(changes, tuple):  # drawn: the mutations depend on this base's fields
        changes = changes.draw(changes_for_base(bases[name]), label="changes")
    check(bases[name], changes)
