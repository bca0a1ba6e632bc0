"""User prompt templates render sandboxed: fields yes, Python internals no, and the error names the file."""

import pytest

from crv_ray.refine.prompts import render_messages

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ problem.__class__.__base__.__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ '{0.__class__}'.format(problem) }}",
]


@pytest.mark.parametrize("body", ESCAPES)
def test_python_internals_are_refused_naming_the_file(tmp_path, body):
    path = tmp_path / "evil_student.j2"
    path.write_text(f"Solve: {{{{ problem }}}}\n{body}\n")
    with pytest.raises(ValueError) as e:
        render_messages("student", path, problem="1+1?")
    assert str(path) in str(e.value) and "stopped by Jinja's sandbox" in str(e.value) and "'student'" in str(e.value)


def test_fields_filters_and_loops_still_render(tmp_path):
    path = tmp_path / "student.j2"
    path.write_text("System {{ who | upper }}\n---USER---\n{% for w in problem.split() %}[{{ w }}]{% endfor %} "
                    "{{ '%d' % n }} {{ 'a,b'.split(',') | join('+') }}\n")
    assert render_messages("student", path, who="crv", problem="1 + 1", n=3) == [
        {"role": "system", "content": "System CRV"}, {"role": "user", "content": "[1][+][1] 3 a+b"}]
