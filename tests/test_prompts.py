import dataclasses
import json

import pytest
from transformers import AutoTokenizer

from hm_utils.data import Example
from hm_utils.prompts import (
    TEMPLATES,
    PromptTemplate,
    default_template,
    format_options,
    get_template,
    load_prompt_choice,
    option_letters,
    render_messages,
    render_prompt,
    render_target,
    render_user,
    save_prompt_choice,
    templates_for,
)

ZH_MCQ = Example(
    id="zh-1",
    dataset="cmexam",
    language="zh",
    task_type="mcq",
    instruction="请回答下面的选择题。",
    input="人体泵血的器官是？",
    output="心脏",
    options=("肝脏", "心脏", "肾脏", "肺"),
    answer_index=1,
)
EN_QA = Example(
    id="en-1",
    dataset="defs",
    language="en",
    task_type="qa",
    instruction="Define the medical term.",
    input="anemia",
    output="A lack of healthy red blood cells.",
)


@pytest.fixture(scope="module")
def tokenizer(base_checkpoint):
    return AutoTokenizer.from_pretrained(base_checkpoint)


def test_registry_has_candidates_per_pair():
    for language in ("en", "zh"):
        for task_type in ("mcq", "qa"):
            candidates = templates_for(language, task_type)
            assert len(candidates) >= 3, (language, task_type)
            assert all(t.language == language and t.task_type == task_type for t in candidates)


def test_default_is_first_candidate():
    assert default_template("zh", "mcq") == templates_for("zh", "mcq")[0]
    assert default_template("en", "qa").name == "en_qa_plain"


def test_registry_keys_match_names():
    assert all(name == template.name for name, template in TEMPLATES.items())


def test_template_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TEMPLATES["en_qa_plain"].user = "{input}"


def test_template_rejects_unknown_placeholder():
    with pytest.raises(ValueError, match="unknown placeholders"):
        PromptTemplate("bad", "en", "qa", None, "{input} {question}")


def test_mcq_template_requires_options():
    with pytest.raises(ValueError, match="options"):
        PromptTemplate("bad", "en", "mcq", None, "{instruction} {input}")


def test_template_requires_input():
    with pytest.raises(ValueError, match="input"):
        PromptTemplate("bad", "en", "qa", None, "{instruction}")


def test_template_rejects_bad_language():
    with pytest.raises(ValueError, match="language"):
        PromptTemplate("bad", "fr", "qa", None, "{input}")


def test_option_letters():
    assert option_letters(4) == ["A", "B", "C", "D"]
    assert option_letters(26)[-1] == "Z"


@pytest.mark.parametrize("n", [0, 27])
def test_option_letters_out_of_range(n):
    with pytest.raises(ValueError, match=str(n)):
        option_letters(n)


def test_format_options():
    assert format_options(("肝脏", "心脏")) == "A. 肝脏\nB. 心脏"
    assert format_options(None) == ""


def test_render_target_mcq():
    assert render_target(ZH_MCQ) == "B. 心脏"


def test_render_target_qa():
    assert render_target(EN_QA) == "A lack of healthy red blood cells."


def test_render_target_bad_answer_index():
    bad = dataclasses.replace(ZH_MCQ, answer_index=4)
    with pytest.raises(ValueError, match="answer_index"):
        render_target(bad)


def test_render_user_plain_mcq():
    text = render_user(ZH_MCQ, get_template("zh_mcq_plain"))
    assert text == "请回答下面的选择题。\n\n人体泵血的器官是？\n\nA. 肝脏\nB. 心脏\nC. 肾脏\nD. 肺"


def test_render_user_collapses_blank_lines():
    example = dataclasses.replace(EN_QA, instruction="")
    assert render_user(example, get_template("en_qa_plain")) == "anemia"


def test_render_user_keeps_literal_braces():
    example = dataclasses.replace(EN_QA, input="value {x} in set {}")
    assert "value {x} in set {}" in render_user(example, get_template("en_qa_plain"))


def test_render_messages_with_system():
    messages = render_messages(ZH_MCQ, get_template("zh_mcq_expert"))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "你是一名医学专家，请准确回答选择题。"
    assert "选项：\nA. 肝脏" in messages[1]["content"]


def test_render_messages_without_system():
    messages = render_messages(EN_QA, get_template("en_qa_plain"))
    assert [m["role"] for m in messages] == ["user"]


def test_render_messages_task_mismatch():
    with pytest.raises(ValueError, match="task_type"):
        render_messages(EN_QA, get_template("en_mcq_plain"))


def test_render_prompt_chat_template(tokenizer):
    prompt = render_prompt(tokenizer, ZH_MCQ, get_template("zh_mcq_expert"))
    assert prompt.startswith("<|im_start|>system\n你是一名医学专家")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "D. 肺" in prompt


def test_render_prompt_without_chat_template(tokenizer):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(plain, EN_QA, get_template("en_qa_plain"))


def test_prompt_choice_round_trip(tmp_path):
    path = tmp_path / "sub" / "prompts.json"
    choice = {"cmexam": "zh_mcq_expert", "定义": "en_qa_short"}
    save_prompt_choice(path, choice)
    assert load_prompt_choice(path) == choice
    assert "定义" in path.read_text(encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == choice


def test_prompt_choice_unknown_name(tmp_path):
    with pytest.raises(KeyError, match="no_such_template"):
        save_prompt_choice(tmp_path / "p.json", {"task": "no_such_template"})
    assert not (tmp_path / "p.json").exists()


def test_prompt_choice_load_unknown_name(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"task": "missing_template"}', encoding="utf-8")
    with pytest.raises(KeyError, match="missing_template"):
        load_prompt_choice(path)


def test_prompt_choice_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_prompt_choice(tmp_path / "absent.json")
