"""Teaching subcommands: `sandbox floats`, `sandbox softmax`, `sandbox demo`.

Thin: parse, call the pure functions in sandbox.teaching, print. Numbers come
in as strings and are parsed here so a bad one is named in a one-line error.
Negative numbers that argparse would take for options go after `--`
(`sandbox softmax --dtype fp16 -- -1e-8 2`).
"""

from __future__ import annotations

import argparse

from sandbox.errors import UserError
from sandbox.teaching import demos, floats, print_table, softmax
from sandbox.teaching.formats import DEFAULT_FORMATS, FORMATS, parse_formats

NEGATIVE_HINT = "options first, then negative numbers after `--`, e.g. `--dtype fp16 -- -1e-8 2`"


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number") from None


def register(subparsers) -> None:
    floats_cmd = subparsers.add_parser(
        "floats",
        help="what fp32/bf16/fp16/fp8 store for a value: bits, rounding error, overflow, underflow",
        epilog=NEGATIVE_HINT,
    )
    floats_cmd.add_argument("values", nargs="*", metavar="VALUE", help="numbers to store, e.g. 70000 3.14 1e-8")
    floats_cmd.add_argument("--formats", default=None, help="comma-separated formats (default fp32,bf16,fp16,e4m3,e5m2)")
    floats_cmd.add_argument("--table", action="store_true", help="print the formats' properties (max, epsilon, ...)")
    floats_cmd.set_defaults(func=cmd_floats)

    softmax_cmd = subparsers.add_parser("softmax", help="naive vs stable softmax, log-sum-exp, cross-entropy",
                                        epilog=NEGATIVE_HINT)
    softmax_cmd.add_argument("logits", nargs="+", metavar="LOGIT")
    softmax_cmd.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16 (default fp32)")
    softmax_cmd.add_argument("--target", type=int, default=None, metavar="I",
                             help="index of the true class: adds cross-entropy")
    softmax_cmd.add_argument("--temperature", default="1.0", metavar="T", help="divide the logits by T (default 1)")
    softmax_cmd.set_defaults(func=cmd_softmax)

    demo = subparsers.add_parser("demo", help="small numeric demos of mixed-precision pitfalls")
    demo.add_argument("name", nargs="?", metavar="NAME", help="demo to run (see --list)")
    demo.add_argument("--list", action="store_true", help="list the demos")
    demo.set_defaults(func=cmd_demo)


def cmd_floats(args: argparse.Namespace) -> int:
    if not args.values and not args.table:
        raise UserError("give at least one VALUE, or --table")
    values = [_number(v, "VALUE") for v in args.values]
    formats = parse_formats(args.formats or ",".join(DEFAULT_FORMATS))
    if args.table:
        floats.render_formats(formats if args.formats else list(FORMATS.values()))
    if values:
        floats.render_values(floats.analyze_all(values, formats))
    return 0


def cmd_softmax(args: argparse.Namespace) -> int:
    logits = [_number(v, "LOGIT") for v in args.logits]
    temperature = _number(args.temperature, "--temperature")
    softmax.render(softmax.explore(logits, args.dtype, args.target, temperature))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.list or args.name == "list":  # `sandbox demo list`, like `sandbox lesson list`
        rows = [(str(i), n, s) for i, (n, (s, _)) in enumerate(demos.DEMOS.items(), 1)]
        print_table("Demos: sandbox demo NAME", ("#", "name", "what it shows"), rows)
        return 0
    if not args.name:
        raise UserError(f"give a demo NAME; choose from {', '.join(demos.DEMOS)}")
    print_table(*demos.run(args.name.replace("_", "-")).table())  # either spelling, as lessons accept
    return 0
