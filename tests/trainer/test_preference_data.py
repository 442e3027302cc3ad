"""Preference (DPO) lines: what is accepted, each way a line is refused, one kind per file,
and the trainer's refusal of the wrong kind for its objective (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.config import TrainConfig
from trainer.data import prepare_inputs
from trainer.errors import DataError
from trainer.formats import DatasetScanner, PreferenceExample, read_examples

from .trainer_testdata import TINY_FACTS, chat_row, write_jsonl


def pref_row(question: str, good: str, bad: str, **extra: Any) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": question}], **extra},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


def scan(rows: list[Any]) -> DatasetScanner:
    scanner = DatasetScanner()
    scanner.feed("".join(json.dumps(r) + "\n" for r in rows).encode())
    scanner.finish()
    return scanner


def test_good_preference_lines_are_read_with_their_kind(tmp_path: Path) -> None:
    rows = [
        pref_row("Sky?", "Blue.", "Green.", tools=[], parallel_tool_calls=False),
        {
            "input": {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Grass?"},
                ]
            },
            "preferred_output": [{"role": "assistant", "content": "Green."}],
            "non_preferred_output": [{"role": "assistant", "content": "Grass is usually green."}],
        },
    ]
    scanner = scan(rows)
    assert scanner.ok, scanner.problems
    stats = scanner.stats.as_dict()
    assert stats["kind"] == "preference" and stats["formats"] == {"preference": 2}
    assert stats["examples"] == 2 and stats["messages"] == 3 + 6

    first, second = read_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert isinstance(first, PreferenceExample) and isinstance(second, PreferenceExample)
    assert (first.preferred, first.rejected) == ("Blue.", "Green.")
    # As a supervised example: the prompt's own assistant turn is context, the answer trained.
    chat = second.with_answer(second.preferred).messages
    assert [(m.role, m.weight) for m in chat if m.role == "assistant"] == [
        ("assistant", 0),
        ("assistant", 1),
    ]
    assert chat[-1].content == "Green."
    assert scan([chat_row("Sky?", "Blue.")]).stats.as_dict()["kind"] == "supervised"


GOOD = pref_row("Sky?", "Blue.", "Green.")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({k: v for k, v in GOOD.items() if k != "non_preferred_output"},
         "lacks non_preferred_output"),
        ({**GOOD, "weight": 1}, "unknown key(s): weight"),
        ({**GOOD, "input": [{"role": "user", "content": "x"}]}, "input must be an object"),
        ({**GOOD, "input": {"messages": []}}, "input.messages must be a non-empty list"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"}], "temp": 1}},
         "input has unknown key(s): temp"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": ""}]}},
         "input.messages[0].content must not be empty"),
        ({**GOOD, "input": {"messages": [{"role": "robot", "content": "x"}]}},
         "input.messages[0].role must be one of"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": "x", "weight": 0}]}},
         "input.messages[0].weight: the prompt is never trained on"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"},
                                         {"role": "assistant", "content": "y"}]}},
         "must end with a user message"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"}],
                            "tools": [{"type": "function"}]}},
         "tool definitions are not supported"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": "x"}],
                            "parallel_tool_calls": "yes"}}, "parallel_tool_calls must be true"),
        ({**GOOD, "preferred_output": {"role": "assistant", "content": "Blue."}},
         "preferred_output must be a list of exactly one assistant message"),
        ({**GOOD, "preferred_output": [{"role": "assistant", "content": "a"}] * 2},
         "preferred_output must be a list of exactly one"),
        ({**GOOD, "non_preferred_output": [{"role": "user", "content": "Green."}]},
         "non_preferred_output[0].role must be 'assistant'"),
        ({**GOOD, "non_preferred_output": [{"role": "assistant", "content": 3}]},
         "non_preferred_output[0].content must be a string"),
        ({**GOOD, "non_preferred_output": [{"role": "assistant", "content": "x", "weight": 1}]},
         "non_preferred_output[0] has unknown key(s): weight"),
        ({**GOOD, "non_preferred_output": [{"role": "assistant", "content": " Blue. "}]},
         "are the same answer"),
    ],
)  # fmt: skip
def test_each_bad_preference_line_is_named(row: dict[str, Any], problem: str) -> None:
    scanner = scan([GOOD, row, GOOD])
    assert not scanner.ok and len(scanner.problems) == 1
    assert scanner.problems[0].startswith("line 2: ") and problem in scanner.problems[0]


@pytest.mark.parametrize("preference_first", [True, False])
def test_a_file_mixing_kinds_is_refused_at_the_first_odd_line(preference_first: bool) -> None:
    pref, chat = pref_row("Sky?", "Blue.", "Green."), chat_row("Sky?", "Blue.")
    first, other = (pref, chat) if preference_first else (chat, pref)
    scanner = scan([first, first, other, first, other])
    assert [p.split(":")[0] for p in scanner.problems] == ["line 3", "line 5"]
    kinds = ("preference", "supervised") if preference_first else ("supervised", "preference")
    assert f"a {kinds[1]} example in a file of {kinds[0]} examples" in scanner.problems[0]
    assert "line 1" in scanner.problems[0]


def test_the_trainer_refuses_the_wrong_kind_for_its_objective(tmp_path: Path) -> None:
    prefs = write_jsonl(tmp_path / "p.jsonl", [pref_row(q, a, "No.") for q, a in TINY_FACTS])
    chats = write_jsonl(tmp_path / "c.jsonl", [chat_row(q, a) for q, a in TINY_FACTS])
    with pytest.raises(DataError, match="holds preference examples; the sft objective"):
        prepare_inputs(TrainConfig(), data_path=prefs)
    dpo = TrainConfig(objective="dpo")
    with pytest.raises(DataError, match="holds supervised examples; the dpo objective"):
        prepare_inputs(dpo, data_path=chats)
    with pytest.raises(DataError, match="the validation file holds supervised"):
        prepare_inputs(dpo, data_path=prefs, validation_path=chats)
    inputs = prepare_inputs(dpo, data_path=prefs)
    # The probe's view: each prompt with its preferred answer.
    assert [ex.messages[-1].content for ex in inputs.train] == [a for _, a in TINY_FACTS]
    assert len(inputs.pairs_train) == len(TINY_FACTS)
    assert inputs.hyperparameters.beta == 0.1  # "auto"
    assert prepare_inputs(TrainConfig(), data_path=chats).hyperparameters.beta is None
