"""The Evals API's graders: criteria checked as OpenAI's SDK sends them, templates, the
similarity metrics against hand-computed values, and reading a judge model's answers."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from openai.types.eval_create_response import (
    TestingCriterionEvalGraderScoreModel,
    TestingCriterionEvalGraderTextSimilarity,
)
from openai.types.evals.runs.output_item_retrieve_response import Result
from openai.types.graders import LabelModelGrader, StringCheckGrader

from api.errors import InvalidRequest
from api.services import graders
from api.services.graders import (
    CriterionError,
    GradeResult,
    grade_judgement,
    grade_local,
    item_passed,
    judge_messages,
    render,
    render_messages,
    similarity,
    validate_criteria,
)

STRING_CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
SIMILARITY = {
    "type": "text_similarity",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "rouge_1",
    "pass_threshold": 0.5,
}
LABEL = {
    "type": "label_model",
    "name": "tone",
    "model": "judge",
    "input": [
        {"role": "developer", "content": "Classify the tone."},
        {
            "type": "message",
            "role": "user",
            "content": {"type": "input_text", "text": "{{item.q}}"},
        },
    ],
    "labels": ["positive", "neutral", "negative"],
    "passing_labels": ["positive", "neutral"],
}
SCORE = {
    "type": "score_model",
    "name": "quality",
    "model": "judge",
    "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}],
    "range": [0, 10],
    "pass_threshold": 7,
}
ALL = [STRING_CHECK, SIMILARITY, LABEL, SCORE]


def only(criterion: dict[str, Any]) -> dict[str, Any]:
    return validate_criteria([criterion])[0]


# --- validate_criteria ----------------------------------------------------------------------


def test_valid_criteria_are_normalized_and_parse_as_the_sdks_graders() -> None:
    sc, sim, label, score = validate_criteria(ALL)
    assert sim["name"] == "text_similarity-1"  # filled in
    assert label["input"] == [
        {"type": "message", "role": "developer", "content": "Classify the tone."},
        {"type": "message", "role": "user", "content": "{{item.q}}"},
    ]
    assert score["range"] == [0.0, 10.0] and score["pass_threshold"] == 7.0
    StringCheckGrader.model_validate(sc)
    TestingCriterionEvalGraderTextSimilarity.model_validate(sim)
    LabelModelGrader.model_validate(label)
    TestingCriterionEvalGraderScoreModel.model_validate(score)


def test_score_model_defaults_to_range_0_1_passing_from_the_midpoint() -> None:
    bare = {k: v for k, v in SCORE.items() if k not in ("range", "pass_threshold")}
    criterion = only(bare | {"sampling_params": {"temperature": 0, "seed": 3, "top_p": None}})
    assert criterion["range"] == [0.0, 1.0] and criterion["pass_threshold"] == 0.5
    assert criterion["sampling_params"] == {"temperature": 0.0, "seed": 3}


def test_filled_names_do_not_clash_with_given_ones() -> None:
    nameless = {k: v for k, v in STRING_CHECK.items() if k != "name"}
    criteria = validate_criteria([STRING_CHECK | {"name": "string_check-1"}, nameless])
    assert [c["name"] for c in criteria] == ["string_check-1", "string_check-1-1"]


def test_unsupported_graders_say_which_are_supported() -> None:
    with pytest.raises(CriterionError) as caught:
        validate_criteria([STRING_CHECK, {"type": "python", "name": "p", "source": "x"}])
    error = caught.value
    assert isinstance(error, InvalidRequest) and error.status_code == 400
    assert (error.param, error.code) == ("testing_criteria[1].type", "unsupported_grader")
    assert "label_model" in error.message and "score_model" in error.message


def test_a_mistyped_grader_type_is_suggested() -> None:
    with pytest.raises(CriterionError, match="Did you mean 'string_check'"):
        only(STRING_CHECK | {"type": "string_chek"})


def test_meteor_is_refused_as_unsupported_here() -> None:
    with pytest.raises(CriterionError, match="not supported by this deployment") as caught:
        validate_criteria([STRING_CHECK, SIMILARITY | {"evaluation_metric": "meteor"}])
    assert caught.value.param == "testing_criteria[1].evaluation_metric"
    assert caught.value.code == "unsupported_metric"


def _without(criterion: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in criterion.items() if k != key}


IMAGE = {"type": "input_image", "image_url": "https://example.com/cat.png"}
INVALID, MISSING, UNKNOWN = "invalid_value", "missing_required_parameter", "unknown_parameter"
FIRST = "testing_criteria[0]"
BAD = [
    ({"type": "string_check"}, "testing_criteria", INVALID),
    ([], "testing_criteria", INVALID),
    ([STRING_CHECK | {"name": str(i)} for i in range(17)], "testing_criteria", INVALID),
    (["string_check"], FIRST, INVALID),
    ([{"type": ["string_check"]}], f"{FIRST}.type", "unsupported_grader"),
    ([STRING_CHECK, STRING_CHECK], "testing_criteria[1].name", INVALID),
    ([STRING_CHECK | {"pass_threshold": 1}], f"{FIRST}.pass_threshold", UNKNOWN),
    ([STRING_CHECK | {"operation": "contains"}], f"{FIRST}.operation", INVALID),
    ([STRING_CHECK | {"input": "x" * 65537}], f"{FIRST}.input", INVALID),
    ([STRING_CHECK | {"reference": 5}], f"{FIRST}.reference", INVALID),
    ([_without(SIMILARITY, "pass_threshold")], f"{FIRST}.pass_threshold", MISSING),
    ([SIMILARITY | {"pass_threshold": 1.5}], f"{FIRST}.pass_threshold", INVALID),
    ([SIMILARITY | {"pass_threshold": True}], f"{FIRST}.pass_threshold", INVALID),
    ([SIMILARITY | {"evaluation_metric": "bert"}], f"{FIRST}.evaluation_metric", INVALID),
    ([LABEL | {"labels": ["yes", "Yes"]}], f"{FIRST}.labels[1]", INVALID),
    ([LABEL | {"labels": []}], f"{FIRST}.labels", INVALID),
    ([LABEL | {"passing_labels": ["great"]}], f"{FIRST}.passing_labels[0]", INVALID),
    ([LABEL | {"model": " "}], f"{FIRST}.model", INVALID),
    ([_without(LABEL, "model")], f"{FIRST}.model", MISSING),
    ([LABEL | {"input": []}], f"{FIRST}.input", INVALID),
    ([LABEL | {"input": [{"role": "tool", "content": "x"}]}], f"{FIRST}.input[0].role", INVALID),
    (
        [LABEL | {"input": [{"role": "user", "content": IMAGE}]}],
        f"{FIRST}.input[0].content",
        INVALID,
    ),
    ([LABEL | {"input": [{"role": "user"}]}], f"{FIRST}.input[0].content", MISSING),
    ([SCORE | {"range": [1, 1]}], f"{FIRST}.range", INVALID),
    ([SCORE | {"range": [0, "10"]}], f"{FIRST}.range", INVALID),
    ([SCORE | {"pass_threshold": 11}], f"{FIRST}.pass_threshold", INVALID),
    ([SCORE | {"sampling_params": {"logprobs": 1}}], f"{FIRST}.sampling_params.logprobs", UNKNOWN),
    ([SCORE | {"sampling_params": {"seed": -1}}], f"{FIRST}.sampling_params.seed", INVALID),
]


@pytest.mark.parametrize(("criteria", "param", "code"), BAD)
def test_bad_criteria_name_the_parameter(criteria: Any, param: str, code: str) -> None:
    with pytest.raises(CriterionError) as caught:
        validate_criteria(criteria)
    assert (caught.value.param, caught.value.code) == (param, code)


# --- templates ------------------------------------------------------------------------------

CTX = {
    "item": {
        "answer": "Paris",
        "city": {"name": "Lyon", "tags": ["food", "silk"]},
        "n": 3,
        "ok": True,
        "none": None,
        "meta": {"a": [1, 2], "b": "é"},
    },
    "sample": {"output_text": "It is Paris."},
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Q: {{item.answer}}!", "Q: Paris!"),
        (
            "{{ item.city.name }} / {{item.city.tags[1]}} / {{item.city.tags.0}}",
            "Lyon / silk / food",
        ),
        ("[{{item.missing}}|{{item.city.tags[9]}}|{{sample.nope.deeper}}|{{other}}]", "[|||]"),
        ("{{item.n}} {{item.ok}} {{item.none}}", "3 true null"),
        ("{{item.meta}}", '{"a":[1,2],"b":"é"}'),
        ("{{sample.output_text}}", "It is Paris."),
        ("{ item.answer } {{item.answer", "{ item.answer } {{item.answer"),
        ("{{{item.answer}}}", "{Paris}"),
    ],
)
def test_render(template: str, expected: str) -> None:
    assert render(template, CTX) == expected


def test_a_huge_value_repeated_stops_at_the_rendered_limit() -> None:
    ctx = {"item": {"big": "x" * 100_000}}
    rendered = render("{{item.big}}" * 5000, ctx)
    assert len(rendered) == graders.MAX_RENDERED_CHARS


def test_render_messages_keeps_roles_and_renders_content() -> None:
    messages = only(LABEL)["input"]
    assert render_messages(messages, {"item": {"q": "I love it"}}) == [
        {"role": "developer", "content": "Classify the tone."},
        {"role": "user", "content": "I love it"},
    ]


# --- string_check ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "output", "reference", "passed"),
    [
        ("eq", "Paris", "Paris", True),
        ("eq", "paris", "Paris", False),
        ("ne", "Lyon", "Paris", True),
        ("ne", "Paris", "Paris", False),
        ("like", "It is Paris.", "Paris", True),
        ("like", "It is PARIS.", "Paris", False),
        ("ilike", "It is PARIS.", "paris", True),
        ("ilike", "It is Lyon.", "paris", False),
    ],
)
def test_string_check(operation: str, output: str, reference: str, passed: bool) -> None:
    criterion = only(STRING_CHECK | {"operation": operation})
    ctx = {"item": {"answer": reference}, "sample": {"output_text": output}}
    result = grade_local(criterion, ctx)
    assert (result.passed, result.score) == (passed, float(passed))


# --- similarity -----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", graders.METRICS)
def test_identical_texts_score_one_and_disjoint_zero(metric: str) -> None:
    assert similarity("The cat sat.", "The cat sat.", metric=metric) == 1.0
    assert similarity("", "", metric=metric) == 1.0
    assert similarity("abc", "xyz", metric=metric) == 0.0
    assert similarity("", "something", metric=metric) == 0.0


@pytest.mark.parametrize(
    ("metric", "candidate", "reference", "expected"),
    [
        ("fuzzy_match", "kitten", "sitting", 8 / 13),  # LCS "ittn"
        ("fuzzy_match", "Paris", "paris", 0.8),  # case counts
        ("rouge_1", "the cat sat", "the cat ran", 2 / 3),
        ("rouge_2", "the cat sat", "the cat ran", 1 / 2),
        ("rouge_3", "the cat sat", "the cat ran", 0.0),
        ("rouge_1", "a b c", "c b a", 1.0),  # same words, any order
        ("rouge_l", "a b c", "c b a", 1 / 3),  # ... but one in sequence
        ("rouge_l", "the cat sat on the mat", "the cat lay on a mat", 2 / 3),
        ("rouge_5", "The cat sat!", "the cat sat", 1.0),  # case and punctuation ignored
        ("bleu", "a b c d", "a b c e", (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25),
        ("bleu", "a b c", "a b c d e f", math.exp(1 - 6 / 3)),  # brevity penalty alone
        ("gleu", "a b c d", "a b c e", 6 / 10),
        ("gleu", "a b", "a b c d", 3 / 10),  # recall: 3 of the reference's 10 n-grams
    ],
)
def test_metric_values(metric: str, candidate: str, reference: str, expected: float) -> None:
    assert similarity(candidate, reference, metric=metric) == pytest.approx(expected)


def test_bleu_ranks_closer_paraphrases_higher() -> None:
    reference = "the quick brown fox jumps over the lazy dog"
    close = similarity("the quick brown fox leaps over the lazy dog", reference, metric="bleu")
    far = similarity("a fast brown fox leaps over a sleepy dog", reference, metric="bleu")
    assert 0 < far < close < 1


def test_fuzzy_match_is_the_indel_ratio_on_random_strings() -> None:
    def lcs(a: str, b: str) -> int:
        row = [0] * (len(b) + 1)
        for x in a:
            diagonal, row[0] = 0, 0
            for j, y in enumerate(b, 1):
                diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    rng = random.Random(7)
    for _ in range(300):
        a = "".join(rng.choices("abcd", k=rng.randint(1, 80)))
        b = "".join(rng.choices("abcde", k=rng.randint(1, 80)))
        expected = 1.0 if a == b else 2 * lcs(a, b) / (len(a) + len(b))
        assert similarity(a, b, metric="fuzzy_match") == pytest.approx(expected), (a, b)


def test_text_similarity_passes_from_its_threshold() -> None:
    criterion = only(SIMILARITY)  # rouge_1 >= 0.5
    ctx = {"item": {"answer": "the cat ran"}, "sample": {"output_text": "the cat sat"}}
    assert grade_local(criterion, ctx) == GradeResult(
        "text_similarity-0", "text_similarity", True, 2 / 3
    )
    failing = grade_local(criterion | {"pass_threshold": 0.7}, ctx)
    assert not failing.passed and failing.score == pytest.approx(2 / 3)


# --- judges ---------------------------------------------------------------------------------


def test_label_judge_is_told_the_labels_at_the_end_of_the_user_message() -> None:
    messages = judge_messages(only(LABEL), {"item": {"q": "I love it"}})
    assert messages[0] == {"role": "system", "content": "Classify the tone."}
    assert len(messages) == 2 and messages[1]["role"] == "user"
    assert messages[1]["content"].startswith("I love it\n\n")
    assert '"positive", "neutral", "negative"' in messages[1]["content"]


def test_score_judge_gets_its_own_instruction_after_an_assistant_turn() -> None:
    criterion = only(
        SCORE | {"input": [{"role": "assistant", "content": "{{sample.output_text}}"}]}
    )
    messages = judge_messages(criterion, {"sample": {"output_text": "Hi"}})
    assert messages[0] == {"role": "assistant", "content": "Hi"}
    assert messages[1]["role"] == "user" and "number from 0 to 10" in messages[1]["content"]


@pytest.mark.parametrize(
    ("output", "label"),
    [
        ("Positive", "positive"),
        ('  "NEGATIVE".', "negative"),
        ("**neutral**", "neutral"),
        ("I would say the tone is negative, not neutral.", "negative"),
        ("positive-ish", "positive"),
        ("It is unpositive", None),
        ("I cannot tell.", None),
    ],
)
def test_label_judgement(output: str, label: str | None) -> None:
    result = grade_judgement(only(LABEL), output)
    assert result.sample == {"output_text": output, "label": label}
    assert result.passed == (label in ("positive", "neutral"))
    assert result.score == float(result.passed)


@pytest.mark.parametrize(
    ("output", "label"),
    [("very good", "very good"), ("This is very good.", "very good"), ("good, not great", "good")],
)
def test_overlapping_labels_prefer_the_earliest_then_the_longest(output: str, label: str) -> None:
    criterion = only(LABEL | {"labels": ["good", "very good"], "passing_labels": ["very good"]})
    assert grade_judgement(criterion, output).sample == {"output_text": output, "label": label}


def test_a_label_with_a_final_period_matches_an_answer_without_one() -> None:
    criterion = only(
        LABEL | {"labels": ["Approved.", "Rejected."], "passing_labels": ["Approved."]}
    )
    result = grade_judgement(criterion, "approved")
    assert result.passed and result.sample == {"output_text": "approved", "label": "Approved."}


@pytest.mark.parametrize(
    ("output", "score", "passed", "parsed"),
    [
        ("8", 8.0, True, 8.0),
        ("Score: 7.5/10", 7.5, True, 7.5),
        ("7", 7.0, True, 7.0),  # at the threshold passes
        ("6.99", 6.99, False, 6.99),
        ("-3", 0.0, False, 0.0),  # clamped to the range
        ("42!", 10.0, True, 10.0),
        ("No idea.", 0.0, False, None),
    ],
)
def test_score_judgement(output: str, score: float, passed: bool, parsed: float | None) -> None:
    result = grade_judgement(only(SCORE), output)
    assert (result.score, result.passed) == (score, passed)
    assert result.sample == {"output_text": output, "score": parsed}


def test_results_have_openais_wire_shape_and_an_item_passes_on_all() -> None:
    ok = GradeResult("exact", "string_check", True, 1.0)
    judged = grade_judgement(only(LABEL), "negative")
    public = Result.model_validate(judged.public())
    assert (public.name, public.type, public.passed, public.score) == (
        "tone",
        "label-model-grader",
        False,
        0.0,
    )
    assert ok.public()["type"] == "string-check-grader" and ok.public()["sample"] is None
    assert item_passed([ok]) and not item_passed([ok, judged])
