"""The report page: one self-contained HTML file (inline CSS, figures as PNG data URIs, no scripts).

Autoescaping is on: every string from the run directory (labels, model names, paths, reasons) is escaped.
"""

from __future__ import annotations

import jinja2

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>crv-ray run report: {{ d.run_dir }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1100px;
        padding: 0 1rem; color: #222; line-height: 1.4; }
 h1 { font-size: 1.4rem; margin-bottom: .2rem; }
 h2 { font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
 h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
 table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
 th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
 th { background: #f4f4f4; }
 td.k, th.k { text-align: left; }
 code { font-size: .85rem; }
 figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top; }
 figure img { max-width: 100%; height: auto; display: block; }
 figcaption { font-size: .8rem; color: #555; }
 .na { color: #8a5a00; background: #fff7e6; border-left: 3px solid #f0b400; padding: .3rem .6rem; }
 .meta { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
 .small { font-size: .8rem; color: #555; }
 .row { display: flex; flex-wrap: wrap; gap: 0 1.5rem; align-items: flex-start; }
 details { margin: .3rem 0; font-size: .9rem; }
</style>
</head>
<body>
{%- macro na(reason) %}<p class="na">not available: {{ reason }}</p>{% endmacro %}
{%- macro figures(key) %}{% for f in figs.get(key, []) %}
<figure id="{{ f.id }}"><img src="{{ f.src }}" alt="{{ f.alt }}"><figcaption>{{ f.title }}</figcaption></figure>
{%- endfor %}{% endmacro %}
{%- macro counts_table(sec, head) %}
<table><tr><th class="k">{{ head }}</th><th>count</th><th>share</th></tr>
{%- for k, v in sec.counts.items() %}
<tr><td class="k">{{ k }}</td><td>{{ v }}</td><td>{{ pct(v / sec.total if sec.total else None) }}</td></tr>
{%- endfor %}
<tr><td class="k"><b>total</b></td><td><b>{{ sec.total }}</b></td><td></td></tr></table>
{%- endmacro %}

<h1>crv-ray run report</h1>
<section id="header">
<p><b>run_dir</b> <code>{{ d.run_dir }}</code><br>
<b>report generated</b> {{ d.generated_at }}
{%- if d.header %}<br><b>refine config hash</b> <code>{{ d.header.config_hash }}</code>
<br><b>refine manifest created</b> {{ d.header.refine_created_at }}{% endif %}</p>
{%- if not d.header %}{{ na(d.header_missing) }}{% else %}
<div class="meta">
<div><h3>Reconciliation (refine)</h3>
<table id="reconciliation">
{%- for k, v in d.header.reconciliation.items() %}<tr><td class="k">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
{%- for k, v in d.header.shards.items() %}<tr><td class="k">shards {{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table></div>
<div><h3>Refine stage counts</h3>
<table id="stage-counts">
{%- for k, v in d.header.stage_counts.items() %}<tr><td class="k">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table></div>
<div><h3>Package versions</h3>
<table id="packages">
{%- for k, v in packages.items() %}<tr><td class="k">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</table></div>
</div>
{%- endif %}
</section>

<section id="labels"><h2>Critic labels</h2>
{%- if d.labels.missing %}{{ na(d.labels.missing) }}{% else %}
<div class="row">{{ figures("labels") }}
{{ counts_table(d.labels, "label") }}</div>
<p class="small">
{%- if d.labels.fallback is not none %}{{ d.labels.fallback }} label(s) are the configured fallback (no parseable
 critic reply).{% endif %}
{%- if d.labels.unlabelled %} {{ d.labels.unlabelled }} successful row(s) have no label.{% endif %}</p>
{%- endif %}
</section>

<section id="rounds"><h2>Verifier pass rate per round</h2>
{%- if d.rounds.missing %}{{ na(d.rounds.missing) }}{% else %}
<div class="row">{{ figures("rounds") }}
<table><tr><th>round</th><th>rethought</th><th>passed</th><th>pass rate</th></tr>
{%- for r in d.rounds.rounds %}
<tr><td>{{ r.round }}</td><td>{{ r.rethought }}</td><td>{{ r.passed }}</td><td>{{ pct(r.pass_rate) }}</td></tr>
{%- endfor %}</table></div>
{%- endif %}
</section>

<section id="lengths"><h2>CoT length before and after rethinking</h2>
{%- if d.lengths.missing %}{{ na(d.lengths.missing) }}{% else %}
{%- if figs.lengths %}{{ figures("lengths") }}{% else %}{{ na("no row has an aligned CoT") }}{% endif %}
<p class="small">Lengths in {{ d.lengths.unit }}, means over successful trace rows. "Aligned" is the SFT target
 (a verified rewrite for easy/hard, the original for medium); "rewrite" counts verified rewrites only.</p>
<table id="lengths-table"><tr><th class="k" rowspan="2">label</th><th colspan="2">all rows</th>
<th colspan="3">rows with an aligned CoT</th><th colspan="3">rows with a verified rewrite</th></tr>
<tr><th>rows</th><th>original</th><th>rows</th><th>original</th><th>aligned</th><th>rows</th><th>original</th>
<th>rewrite</th></tr>
{%- for r in d.lengths.by_label %}
<tr><td class="k">{{ r.label }}</td><td>{{ r.rows }}</td><td>{{ num(r.original_mean) }}</td>
<td>{{ r.aligned_rows }}</td><td>{{ num(r.aligned_original_mean) }}</td><td>{{ num(r.aligned_mean) }}</td>
<td>{{ r.rewrite_rows }}</td><td>{{ num(r.rewrite_original_mean) }}</td><td>{{ num(r.rewrite_mean) }}</td></tr>
{%- endfor %}</table>
{%- endif %}
</section>

<section id="negatives"><h2>Negatives by source</h2>
{%- if d.negatives.missing %}{{ na(d.negatives.missing) }}{% else %}
<div class="row">{{ figures("negatives") }}
{{ counts_table(d.negatives, "source") }}</div>
{%- endif %}
</section>

<section id="pairs"><h2>Preference pairs by gap</h2>
{%- if d.pairs.missing %}{{ na(d.pairs.missing) }}{% else %}
<div class="row">{{ figures("pairs") }}
{{ counts_table(d.pairs, "gap") }}</div>
{%- endif %}
</section>

<section id="training"><h2>Training</h2>
<h3>SFT</h3>
{%- if d.sft.missing %}{{ na(d.sft.missing) }}{% else %}{{ figures("sft") }}{% endif %}
<h3>CogPO</h3>
{%- if d.cogpo.missing %}{{ na(d.cogpo.missing) }}{% else %}
<p class="small">Per-gap points are absent on steps whose batch held no pair of that gap.</p>
<div class="row">{{ figures("cogpo") }}</div>{% endif %}
</section>

<section id="eval"><h2>Evaluation</h2>
{%- if d.eval.missing %}{{ na(d.eval.missing) }}{% else %}
{%- if d.eval.created_at %}<p class="small">eval/summary.json created {{ d.eval.created_at }}</p>{% endif %}
<table id="eval-table">
<tr><th class="k">benchmark</th><th class="k">model</th><th>problems</th><th>samples</th><th>greedy pass@1</th>
<th>pass@1</th><th>maj@k</th><th>k</th><th>mean response tokens</th><th>no answer</th></tr>
{%- for r in d.eval.rows %}
<tr data-benchmark="{{ r.benchmark }}" data-model="{{ r.model }}"><td class="k">{{ r.benchmark }}</td>
<td class="k" title="{{ r.model_path or '' }}">{{ r.model }}</td>
<td>{{ num(r.n_problems) }}</td><td>{{ num(r.n_samples) }}</td>
{%- for key in ("greedy_pass@1", "pass@1", "maj@k") %}
<td data-key="{{ key }}" data-value="{{ r.get(key) if r.get(key) is not none else '' }}">{{ pct(r.get(key)) }}</td>
{%- endfor %}
<td>{{ num(r.k) }}</td><td data-key="mean_response_tokens" data-value="{{ r.mean_response_tokens }}">{{ num(r.mean_response_tokens) }}</td>
<td data-key="no_answer_rate" data-value="{{ r.no_answer_rate }}">{{ pct(r.no_answer_rate) }}</td></tr>
{%- endfor %}</table>
{{ figures("eval") }}
{%- for g in d.eval.groups %}
<details><summary>{{ g.benchmark }}: pass@1 by {{ g.dimension }}</summary>
<table><tr><th class="k">{{ g.dimension }}</th>{% for m in d.eval.models %}<th>{{ m }}</th>{% endfor %}</tr>
{%- for key in g.group_keys %}<tr><td class="k">{{ key }}</td>
{%- for m in d.eval.models %}{% set c = g.cells[key].get(m) %}
<td>{% if c %}{{ pct(c.get("pass@1")) }} <span class="small">(n={{ c.get("n") }})</span>{% endif %}</td>
{%- endfor %}</tr>{% endfor %}
</table></details>
{%- endfor %}
{%- endif %}
</section>
</body>
</html>
"""


def pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.1f}%"


def num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.1f}"
    return f"{int(v)}"


_ENV = jinja2.Environment(autoescape=True)


def render(data: dict, figs: dict[str, list[dict]], packages: dict[str, str]) -> str:
    return _ENV.from_string(TEMPLATE).render(d=data, figs=figs, packages=packages, pct=pct, num=num)
