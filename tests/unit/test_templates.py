import pytest
from jinja2.exceptions import SecurityError

from server.templates import PRESETS, load_template
from server.templates.render import TemplateError

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


def test_chatml() -> None:
    t = load_template("chatml", None)
    out = t.render(MSGS, bos_token="<s>", eos_token="</s>")
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert out.endswith("<|im_start|>assistant\n")


def test_mistral_folds_system_into_first_user_turn() -> None:
    out = load_template("mistral", None).render(MSGS, bos_token="<s>", eos_token="</s>")
    assert out == "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]"


def test_alpaca() -> None:
    out = load_template("alpaca", None).render(MSGS[1:2], bos_token="", eos_token="")
    assert out == "### Instruction:\nHi\n\n### Response:\n"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_renders(name: str) -> None:
    out = load_template(name, None).render(MSGS, bos_token="<s>", eos_token="</s>")
    assert "Bye" in out and "Be brief." in out


def test_gguf_template_used_when_no_preset() -> None:
    src = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    t = load_template(None, src)
    assert t.render(MSGS[1:2], bos_token="", eos_token="") == "[user]Hi"


def test_fallback_is_chatml() -> None:
    assert load_template(None, None).name == "chatml"


def test_unknown_preset() -> None:
    with pytest.raises(TemplateError, match="unknown template"):
        load_template("nope", None)


def test_untrusted_template_is_sandboxed() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises((SecurityError, TemplateError)):
        load_template(None, evil).render(MSGS, bos_token="", eos_token="")


def test_template_cannot_mutate_messages() -> None:
    t = load_template(None, "{% set _ = messages.append(1) %}x")
    with pytest.raises((SecurityError, TemplateError)):
        t.render(MSGS, bos_token="", eos_token="")


def test_raise_exception_helper() -> None:
    t = load_template(None, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="alternate"):
        t.render(MSGS, bos_token="", eos_token="")
