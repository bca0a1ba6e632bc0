import pytest

from crv_ray.refine.prompts import ROLES, TEMPLATE_DIR, load_template, render_messages, render_student_prompt

AWKWARD = (
    "Let $f(x) = \\frac{1}{2}x^2$ and {{ x }} and {% if y %} and {# c #} and ${a}$ and \\boxed{\\{1,2\\}}\n"
    "---USER---\nend"
)
FIELDS = {
    "problem": "Solve $x^{2} = 4$ for {x}.",
    "answer": "\\pm 2",
    "cot": AWKWARD,
    "student_name": "Qwen2.5-7B-Instruct",
    "student_size": "7B",
    "feedback": None,
    "previous": None,
}
REWRITERS = ("rethink_easy", "rethink_hard", "rethink_repair")


def test_every_role_has_a_template_with_a_user_marker():
    for role in ROLES:
        source = (TEMPLATE_DIR / f"{role}.j2").read_text()
        assert "\n---USER---\n" in "\n" + source


@pytest.mark.parametrize("role", ROLES)
def test_awkward_text_passes_through_verbatim(role):
    messages = render_messages(role, **FIELDS)
    assert messages[-1]["role"] == "user"
    user = messages[-1]["content"]
    assert FIELDS["problem"] in user
    if role != "student":
        assert AWKWARD in user and FIELDS["answer"] in user
    # The marker inside a value never splits a message.
    assert len(messages) == (1 if role == "student" else 2)


def test_critic_names_the_student_and_demands_one_word():
    system, user = render_messages("critic", **FIELDS)
    assert system["role"] == "system"
    assert "Qwen2.5-7B-Instruct" in user["content"] and "7B" in user["content"]
    for label in ("easy:", "medium:", "hard:"):
        assert label in user["content"]
    assert "exactly one word: easy, medium or hard" in user["content"]


@pytest.mark.parametrize("role", REWRITERS)
def test_rewriters_feedback_section_only_when_set(role):
    without = render_messages(role, **FIELDS)[-1]["content"]
    assert "verifier_feedback" not in without and "previous_attempt" not in without
    assert "\n\n\n" not in without
    assert "\\boxed{...}" in without and "blank lines" in without
    fields = dict(FIELDS, feedback="Step 3 drops a sign.", previous="old {{ attempt }}")
    with_feedback = render_messages(role, **fields)[-1]["content"]
    assert "Step 3 drops a sign." in with_feedback and "old {{ attempt }}" in with_feedback
    no_previous = render_messages(role, **dict(fields, previous=None))[-1]["content"]
    assert "Step 3 drops a sign." in no_previous and "previous_attempt" not in no_previous
    # feedback/previous may be omitted entirely.
    fields = {k: v for k, v in FIELDS.items() if k not in ("feedback", "previous")}
    assert render_messages(role, **fields)[-1]["content"] == without


def test_verifier_demands_the_reply_format():
    user = render_messages("verifier", problem="p", answer="a", cot="c")[-1]["content"]
    assert "VERDICT: PASS" in user and "VERDICT: FAIL" in user and "REASON:" in user


def test_student_prompt_exact_text():
    assert render_student_prompt("What is $1+1$?") == (
        "What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert render_messages("student", problem="p") == [{"role": "user", "content": render_student_prompt("p")}]


def test_missing_variable_names_template_and_variable():
    with pytest.raises(ValueError, match=r"'critic'.*'student_size'"):
        render_messages("critic", problem="p", answer="a", cot="c", student_name="s")


def test_unknown_role_and_missing_override():
    with pytest.raises(ValueError, match="nope"):
        render_messages("nope", problem="p")
    with pytest.raises(ValueError, match="missing.j2"):
        load_template("critic", override="/nonexistent/missing.j2")


def test_override_file_with_and_without_marker(tmp_path):
    with_marker = tmp_path / "critic.j2"
    with_marker.write_text("Judge for {{ student_size }}.\n---USER---\nCoT: {{ cot }}\n")
    assert render_messages("critic", override=with_marker, cot="{{ a }}", student_size="1B") == [
        {"role": "system", "content": "Judge for 1B."},
        {"role": "user", "content": "CoT: {{ a }}"},
    ]
    user_only = tmp_path / "student.j2"
    user_only.write_text("Q: {{ problem }}\n")
    assert render_student_prompt("1+1", override=str(user_only)) == "Q: 1+1"
    assert load_template("student", override=user_only).render(problem="x") == "Q: x\n"


def test_override_syntax_error_names_the_file(tmp_path):
    broken = tmp_path / "broken.j2"
    broken.write_text("{% if %}")
    with pytest.raises(ValueError, match="broken.j2"):
        render_messages("critic", override=broken)


def test_load_template_is_cached():
    assert load_template("verifier") is load_template("verifier")
