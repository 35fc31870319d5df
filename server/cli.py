"""The `vlmserve` command line: serve | ask | bench | train | eval."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import signal
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

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
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        choices = get_args(annotation) if "Literal" in str(get_origin(annotation)) else None
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, choices=choices, help=help_text,
                            metavar=None if choices else name.upper())


def _settings_from_args(args: argparse.Namespace) -> Any:
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
    app = create_app(settings)
    state = app.state.server
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout)), access_log=False)

    class Server(uvicorn.Server):
        fatal = False

        def handle_exit(self, sig: int, frame: Any) -> None:
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


def cmd_ask(args: argparse.Namespace) -> int:
    import httpx

    content: list[dict[str, Any]] = []
    for path in args.image:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            print(f"vlmserve ask: cannot read image {path}: {e.strerror}", file=sys.stderr)
            return 2
        mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        content.append({"type": "image_url",
                        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}})
    content.append({"type": "text", "text": args.prompt})
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": args.stream}
    for key in ("model", "max_tokens", "temperature", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/v1/chat/completions"
    try:
        with httpx.Client(timeout=args.timeout) as client:
            if not args.stream:
                r = client.post(url, json=body, headers=headers)
                if r.status_code != 200:
                    return _ask_error(r.status_code, r.text)
                print(r.json()["choices"][0]["message"]["content"])
                return 0
            with client.stream("POST", url, json=body, headers=headers) as r:
                if r.status_code != 200:
                    return _ask_error(r.status_code, r.read().decode(errors="replace"))
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        print(file=sys.stdout)
                        return _ask_error(500, json.dumps(chunk))
                    for choice in chunk.get("choices", []):
                        sys.stdout.write(choice.get("delta", {}).get("content") or "")
                        sys.stdout.flush()
                print()
                return 0
    except httpx.HTTPError as e:
        print(f"vlmserve ask: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1


def _ask_error(status: int, text: str) -> int:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    print(f"vlmserve ask: HTTP {status}: {message}", file=sys.stderr)
    return 1


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
    ask.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--model", default=None)
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=None)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--api-key", default=None, help="Bearer key (env VLMSERVE_API_KEY)")
    ask.add_argument("--timeout", type=float, default=120.0)
    sub.add_parser("bench", help="concurrent streaming load against a running server (see `vlmserve bench --help`)",
                   add_help=False)
    sub.add_parser("train", help="train the SHAPES model (see `vlmserve train --help`)", add_help=False)
    sub.add_parser("eval", help="evaluate a model on the SHAPES world (see `vlmserve eval --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] in ("train", "eval"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return cmd_train(argv[1:]) if argv[0] == "train" else cmd_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "ask":
        if args.api_key is None:
            import os

            args.api_key = os.environ.get("VLMSERVE_API_KEY")
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return cmd_ask(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
