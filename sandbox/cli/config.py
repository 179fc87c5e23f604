"""`sandbox config keys` and `sandbox config show`: the schema and a resolved config, discoverable.

`keys` lists every key of the schema with its type, default, valid range and
help line (the same metadata validation uses, so the list cannot drift from
what is accepted); `show` prints the config a run would use, after `base:`
inheritance and `--set` overrides, as YAML that `sandbox train` accepts.
"""

from __future__ import annotations

import json

from sandbox import config as config_lib
from sandbox.cli.options import add_set_option


def cmd_keys(args) -> int:
    rows = [r for r in config_lib.describe() if r["key"].startswith(args.prefix or "")]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    for r in rows:
        rng = f"; {r['range']}" if r["range"] else ""
        print(f"{r['key']}  ({r['type']}, default {r['default']!r}{rng})\n    {r['help']}")
    return 0


def cmd_show(args) -> int:
    cfg = config_lib.load_config(args.config, args.set or [])
    print(config_lib.dump_yaml(cfg), end="")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="list config keys or show a resolved config")
    sub = p.add_subparsers(dest="config_command", metavar="{keys,show}", parser_class=type(p))
    sub.required = True
    k = sub.add_parser("keys", help="every config key with type, default, range and help")
    k.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. precision.")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(func=cmd_keys)
    s = sub.add_parser("show", help="the resolved config (after base: and --set) as YAML")
    s.add_argument("config", help="YAML run config")
    add_set_option(s, "override a key")
    s.set_defaults(func=cmd_show)
