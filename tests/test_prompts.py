"""The template gives the training text, the inference prompt and the GGUF chat template; they must agree."""
import jinja2
import pytest

from cotune.errors import UserError
from cotune.prompts import load_template, parse_template

EOS = "<|im_end|>"


def test_training_text_ends_with_eos_exactly_once():
    t = load_template("fortune_cot")
    text = t.training_text("问题", "推理", "回答", EOS)
    assert text.endswith("回答" + EOS) and text.count(EOS) == 1
    assert t.training_text("问题", "推理", "回答" + EOS, EOS).count(EOS) == 1  # a row that already ends with EOS


def test_training_text_starts_with_the_inference_prompt():
    t = load_template("fortune_cot")
    prompt = t.prompt("1992年闰四月初九巳时生人,女,想了解健康运势")
    assert t.training_text("1992年闰四月初九巳时生人,女,想了解健康运势", "R", "A", EOS).startswith(prompt)
    assert prompt.endswith("<think>\n") and t.reasoning_close == "</think>"


def test_one_pair_of_reasoning_tags_for_training_and_asking():
    t = load_template("fortune_cot")
    text = t.training_text("Q", "R", "A", EOS)
    assert "<思考>" not in text and text.count("<think>") == 1 and text.count("</think>") == 1


def test_chat_template_renders_exactly_the_training_prompt():
    t = load_template("fortune_cot")
    rendered = jinja2.Environment().from_string(t.chat_template()).render(
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "我的财运如何？"}],
        add_generation_prompt=True)
    assert rendered == t.prompt("我的财运如何？")


def test_braces_in_a_template_are_not_jinja(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("{% raw-looking %} {{x}} Q: {question}\n<r>\n{reasoning}\n</r>\n{response}", encoding="utf-8")
    t = load_template(str(f))
    assert jinja2.Environment().from_string(t.chat_template()).render(
        messages=[{"role": "user", "content": "q"}]) == t.prompt("q")


@pytest.mark.parametrize("text, message", [
    ("Q {question} A {response}", "missing placeholder {reasoning}"),
    ("{reasoning} {question}\n<t>\n</t>{response}", "must appear once each, in that order"),
    ("{question}{reasoning}</t>{response}", "put an opening tag"),
    ("{question}<t>{reasoning}{response}", "put a closing tag"),
])
def test_bad_templates_are_refused(text, message):
    with pytest.raises(UserError) as err:
        parse_template(text, "t.txt")
    assert message in str(err.value)


def test_missing_template_file():
    with pytest.raises(UserError, match="no such built-in template or file"):
        load_template("./nope.txt")


ACCEPTED = [
    "{question}\n<think>\n{reasoning}\n</think>\n{response}",  # no text before the question: push crashed on it
    "Q: {question}\nA:\n<r>{reasoning}</r>\n{response}\n",
    "{{x}} {% raw %} Q: {question}\n<t>\n{reasoning}\n</t>{response}",
    '说明 "quoted" {question}\n<think>\n{reasoning}\n</think>\n{response}',
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_every_stage_can_read_an_accepted_template(text):
    """What each stage takes from a template: the training text (data), the prompt (ask, verify), the reasoning
    tags (verify, report), the GGUF's chat template (export, verify) and the Ollama Modelfile (push)."""
    from cotune.push import modelfile
    from cotune.verify import render_chat_template

    t = parse_template(text, "t.txt")
    question = "我的财运如何？"
    assert t.training_text(question, "R", "A", EOS).startswith(t.prompt(question))
    assert t.reasoning_open and t.reasoning_close and t.prompt(question).rstrip().endswith(t.reasoning_open)
    assert render_chat_template(t.chat_template(), question) == t.prompt(question)
    mf = modelfile("m-Q8_0.gguf", t, EOS)
    body = mf.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert body.replace("{{ .Prompt }}", question).replace('{{"{{"}}', "{{") == t.prompt(question)
    assert f'PARAMETER stop "{EOS}"' in mf


@pytest.mark.parametrize("text, message", [
    ("Q {% endraw %} {question}\n<t>\n{reasoning}\n</t>{response}", "holds '{% endraw %}' before {reasoning}"),
    ("Q {%- endraw -%} {question}\n<t>\n{reasoning}\n</t>{response}", "holds '{%- endraw -%}' before {reasoning}"),
    ('Q """ {question}\n<t>\n{reasoning}\n</t>{response}', 'holds """ before {reasoning}'),
    ('{question}\n<t """>\n{reasoning}\n</t>{response}', 'holds """ before {reasoning}'),
])
def test_templates_that_export_or_push_could_not_carry_are_refused(text, message):
    with pytest.raises(UserError) as err:
        parse_template(text, "t.txt")
    assert message in str(err.value)
