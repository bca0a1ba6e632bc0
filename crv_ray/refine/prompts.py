"""Role prompt templates: load a Jinja2 template and render it as chat messages.

Each template file (`prompts/<role>.j2`, or a user's override file) holds a system part and a user part
separated by a line that is exactly `---USER---`. A file without the marker is a user part only. The two
parts are compiled as separate templates, so a value that happens to contain the marker cannot split a
message, and values are never re-templated: `{{`, `{%`, `$`, `\\` and braces in a CoT pass through verbatim.

Templates render in Jinja's sandbox: a template file is user input (a config names it), so it may read the
fields it is given but not reach Python internals (`''.__class__.__mro__`) or call unsafe methods.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment, SecurityError

ROLES = ("critic", "rethink_easy", "rethink_hard", "rethink_repair", "verifier", "judge_original", "inject_error",
         "student")

TEMPLATE_DIR = Path(__file__).parent / "prompts"
USER_MARKER = "---USER---"
_MARKER_LINE = re.compile(r"^---USER---[ \t\r]*$", re.MULTILINE)
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")

# trim_blocks/lstrip_blocks: `{% if %}` lines in the templates leave no stray blank lines.
_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _template_path(name: str, override: str | Path | None) -> Path:
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ValueError(f"prompt template override for {name!r} not found: {path}")
        return path
    if name not in ROLES:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {ROLES} or an override file")
    return TEMPLATE_DIR / f"{name}.j2"


@functools.lru_cache(maxsize=64)
def _read_source(name: str, override: str | None) -> tuple[Path, str]:
    path = _template_path(name, override)
    return path, path.read_text(encoding="utf-8")


def _compile(source: str, path: Path) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"prompt template {path}: syntax error on line {err.lineno}: {err.message}") from err


def _key(override: str | Path | None) -> str | None:
    return None if override is None else str(Path(override).resolve())


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, override: str | None) -> jinja2.Template:
    path, source = _read_source(name, override)
    return _compile(source, path)


def load_template(name: str, override: str | Path | None = None) -> jinja2.Template:
    """The whole template file (marker included) as one Jinja2 template; cached per (name, override)."""
    return _load_cached(name, _key(override))


@functools.lru_cache(maxsize=64)
def _load_parts(name: str, override: str | None) -> tuple[jinja2.Template | None, jinja2.Template, Path]:
    path, source = _read_source(name, override)
    parts = _MARKER_LINE.split(source, maxsplit=1)
    system_src, user_src = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    # Strip only the template's own whitespace around the marker and file ends, never a rendered value.
    system_src, user_src = system_src.strip(), user_src.strip()
    system = _compile(system_src, path) if system_src else None
    return system, _compile(user_src, path), path


def _render(template: jinja2.Template, name: str, path: Path, fields: dict) -> str:
    try:
        return template.render(**fields)
    except jinja2.UndefinedError as err:
        match = _UNDEFINED_NAME.search(str(err))
        variable = match.group(1) if match else str(err)
        raise ValueError(f"prompt template {name!r} ({path}) needs variable {variable!r}, which was not given") from err
    except SecurityError as err:
        raise ValueError(f"prompt template {name!r} ({path}) was stopped by Jinja's sandbox: {err} Templates may use "
                         "the fields they are given, not Python internals") from err


def render_messages(name: str, override: str | Path | None = None, **fields: object) -> list[dict]:
    """Render role `name` as OpenAI-style chat messages; the system message is omitted when empty.

    >>> render_messages("student", problem="1+1?")[0]["role"]
    'user'
    """
    system, user, path = _load_parts(name, _key(override))
    messages = []
    if system is not None:
        system_text = _render(system, name, path, fields)
        if system_text.strip():
            messages.append({"role": "system", "content": system_text})
    messages.append({"role": "user", "content": _render(user, name, path, fields)})
    return messages


def render_student_prompt(problem: str, override: str | Path | None = None) -> str:
    """The student's prompt text: the `prompt` column of the sft and pairs datasets."""
    return render_messages("student", override, problem=problem)[-1]["content"]
