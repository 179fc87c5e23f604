"""`sandbox train` and `sandbox sample`."""

from __future__ import annotations

import math

from sandbox.config import replace
from sandbox.errors import UserError
from sandbox.rundir import check_name


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(title=f"{result.run_dir} ({s['status']})", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v)

    for key, value in s.items():
        if key != "bundle" or value:
            table.add_row(key, fmt(value))
    Console().print(table)


def cmd_train(args) -> int:
    from sandbox.config import load_config
    from sandbox.train.hooks import load_hook
    from sandbox.train.loop import EXIT_FAILURE, train

    if args.name is not None:
        check_name(args.name, "--name")  # before anything is read or built: --name is never a path
    cfg = load_config(args.config, args.set or [])
    if args.name is not None:
        cfg = replace(cfg, name=args.name)
    hooks = [load_hook(h) for h in args.hook or []]
    result = train(cfg, hooks, resume=args.resume, overwrite=args.overwrite)
    _print_summary(result)
    if result.status == "failed":
        where = f"; failure bundle: {result.bundle} (inspect with: sandbox replay {result.bundle})" \
            if result.bundle else ""
        print(f"training stopped at step {result.summary['failed_step']}: {result.summary['cause']}{where}")
        return EXIT_FAILURE
    return 0


def cmd_sample(args) -> int:
    from sandbox.sample import sample_from_run

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature: expected >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: expected in (0, 1], got {args.top_p}")
    text = sample_from_run(args.run_dir, args.prompt, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--name", help="run name, one path component (default: the config's name or file stem)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory (only one the sandbox created)")
    p.add_argument("--hook", action="append", metavar="MODULE:NAME", help="add a trainer hook (repeatable)")
    p.set_defaults(func=cmd_train)

    s = subparsers.add_parser("sample", help="generate text from a trained run")
    s.add_argument("run_dir", help="a run directory with a checkpoint")
    s.add_argument("--prompt", default="", help="text to continue")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)
