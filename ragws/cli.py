"""Command line: ``ragws serve`` (and ``python -m ragws serve``).

Flags are generated from :class:`ragws.config.Settings`, so ``--help`` always lists every
setting with its default and environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, env_name, flag_name, load_settings, setting_fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragws", description="WebSocket inference server for document layout and OCR."
    )
    parser.add_argument("--version", action="version", version=f"ragws {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="start the server",
        description="Start the server. Precedence: flags > RAGWS_* environment > config file "
        "> defaults.",
    )
    serve.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML file with settings (keys as the flags, with underscores); "
        "default: ./config.toml when present",
    )
    for f in setting_fields():
        choices = f.metadata["choices"]
        serve.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=str,  # coerced and validated by load_settings, which names the setting
            default=None,
            metavar=("{" + ",".join(choices) + "}") if choices else f.name.upper(),
            help=f"{f.metadata['help']} (default: {f.default}; env {env_name(f.name)})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        cli = {f.name: getattr(args, f.name) for f in setting_fields()}
        try:
            settings = load_settings(cli, config_path=args.config)
        except ConfigError as exc:
            parser.exit(2, f"ragws: invalid setting: {exc}\n")
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from .server import serve_forever  # imported late: keeps --help fast

        try:
            asyncio.run(serve_forever(settings))
        except Exception as exc:  # start-up failures: model missing, port taken, ...
            logging.getLogger("ragws").error("cannot start: %s", exc)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
