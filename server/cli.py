"""The `vlmserve` command line: serve | ask | chat | bench | train | eval."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

if TYPE_CHECKING:
    from types import FrameType

    from .settings import Settings

log = logging.getLogger("vlmserve")

_SERVE_FLAGS_FIRST = ("model", "host", "port", "device", "dtype", "served_model_name")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (`--max-running` for `max_running`); unset flags leave env/defaults alone."""
    from .settings import Settings

    fields = Settings.model_fields
    order = [*_SERVE_FLAGS_FIRST, *(n for n in fields if n not in _SERVE_FLAGS_FIRST)]
    for name in order:
        info = fields[name]
        flag = "--" + name.replace("_", "-")
        env = f"VLMSERVE_{name.upper()}"
        help_text = f"{info.description} [env {env}]".replace("%", "%%")  # argparse formats help with %
        annotation = info.annotation
        if annotation is bool and name.startswith("no_"):  # `--no-ui`, not `--no-ui / --no-no-ui`
            parser.add_argument(flag, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text)
            continue
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        choices = get_args(annotation) if "Literal" in str(get_origin(annotation)) else None
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices, help=help_text,
                            metavar=None if choices else name.upper())


def _settings_from_args(args: argparse.Namespace) -> Settings:
    from .settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from vlmserve.model.weights import CheckpointError, resolve_checkpoint

    from .api import create_app

    try:
        settings = _settings_from_args(args)
    except ValidationError as e:
        print(f"vlmserve serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolve_checkpoint(settings.model)
        settings.chat_template_text()
    except (CheckpointError, ValueError, OSError) as e:
        print(f"vlmserve serve: {e}", file=sys.stderr)
        return 2
    if settings.replicas > 0 or settings.autoscaling():
        from .scale.launch import serve_on_ray

        return serve_on_ray(settings)
    app = create_app(settings)
    state = app.state.server
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout)), access_log=False)

    class Server(uvicorn.Server):
        fatal = False

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)

    server = Server(config)

    def on_fatal() -> None:
        server.fatal = True
        server.should_exit = True

    state.on_fatal = on_fatal
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with the default SIGTERM
    # action that kills the process (status -15) after a clean drain. A drained SIGTERM is a normal exit: 0.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    log.info("serving %s on http://%s:%d (OpenAI API at /v1)", settings.model_id(), settings.host, settings.port)
    server.run()
    return 1 if server.fatal else 0


def _client_missing(command: str) -> int:
    print(f"vlmserve {command}: vlmserve_client is not installed: pip install ./client (from the repository)",
          file=sys.stderr)
    return 2


def cmd_ask(args: argparse.Namespace) -> int:
    try:
        from vlmserve_client import APIConnectionError, Client, VlmserveError
    except ModuleNotFoundError as e:
        if e.name != "vlmserve_client":
            raise
        return _client_missing("ask")

    images: list[bytes] = []
    if args.image.count("-") > 1:
        print("vlmserve ask: --image - (standard input) can be given once", file=sys.stderr)
        return 2
    for path in args.image:
        if path == "-":
            images.append(sys.stdin.buffer.read())
            continue
        try:
            images.append(Path(path).read_bytes())
        except OSError as e:
            print(f"vlmserve ask: cannot read image {path}: {e.strerror}", file=sys.stderr)
            return 2
    options: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens,
                               "temperature": args.temperature, "seed": args.seed}
    wrote = False
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0) as client:
            if not args.stream:
                print(client.chat(args.prompt, images=images, **options).text)
                return 0
            with client.chat_stream(args.prompt, images=images, **options) as stream:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    wrote = True
            print()
            return 0
    except VlmserveError as e:
        if wrote:
            print()  # end the partial answer's line
        if isinstance(e, APIConnectionError):
            print(f"vlmserve ask: {e.message}", file=sys.stderr)
        else:
            print(f"vlmserve ask: HTTP {e.status}: {e.message}", file=sys.stderr)
        return 1


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat_cli import run_chat

    try:
        return run_chat(args)
    except ModuleNotFoundError as e:
        if e.name != "vlmserve_client":
            raise
        return _client_missing("chat")


def cmd_train(argv: list[str]) -> int:
    from vlmserve.training.cli import train_main

    return train_main(argv) or 0


def cmd_eval(argv: list[str]) -> int:
    from vlmserve.training.cli import eval_main

    return eval_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmserve", description="A vision-language inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (OpenAI-compatible API)")
    _add_settings_flags(serve)
    ask = sub.add_parser("ask", help="ask a running server about images; prints the answer")
    ask.add_argument("prompt")
    ask.add_argument("--url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000")
    ask.add_argument("--image", action="append", default=[],
                     help="image file (repeatable, in order); - reads one from standard input")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--model", default=None)
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=None)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--api-key", default=None, help="Bearer key (env VLMSERVE_API_KEY)")
    ask.add_argument("--timeout", type=float, default=120.0)
    chat = sub.add_parser("chat", help="an interactive multi-turn chat with a running server (/image PATH attaches)")
    from .chat_cli import add_arguments

    add_arguments(chat)
    sub.add_parser("bench", help="concurrent streaming load against a running server (see `vlmserve bench --help`)",
                   add_help=False)
    sub.add_parser("train", help="train the SHAPES model (see `vlmserve train --help`)", add_help=False)
    sub.add_parser("eval", help="evaluate a model on the SHAPES or SOUNDS world (see `vlmserve eval --help`)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # httpx logs every request at INFO: the client commands (ask, chat, bench, eval --url) show answers, a progress
    # bar or a table, not one line per request.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if argv and argv[0] == "bench":
        try:
            from .bench import main as bench_main
        except ModuleNotFoundError as e:
            if e.name != "vlmserve_client":
                raise
            return _client_missing("bench")

        return bench_main(argv[1:])
    if argv and argv[0] in ("train", "eval"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return cmd_train(argv[1:]) if argv[0] == "train" else cmd_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command in ("ask", "chat"):
        if args.api_key is None:
            import os

            args.api_key = os.environ.get("VLMSERVE_API_KEY")
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return cmd_ask(args) if args.command == "ask" else cmd_chat(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
