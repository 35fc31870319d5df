"""`vlmserve chat --url BASE [--image PATH ...]`: an interactive multi-turn chat with a running server.

Each line is a message; the answer streams back as it is generated. `/image PATH` attaches an image to the next
message (repeatable; `--image` attaches to the first), `/reset` starts a new conversation, `/quit` or end of input
(Ctrl-D) leaves; Ctrl-C stops an answer (the server cancels it). The conversation is sent whole with each message,
images included, through vlmserve_client. Answers go to stdout; the banner, notes and errors to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

HELP = "/image PATH attaches an image to your next message, /reset starts over, /quit (or Ctrl-D) leaves"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    parser.add_argument("--system", default=None, help="a system message for the whole conversation")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="Bearer key (env VLMSERVE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=120.0)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_image(path: str) -> bytes | None:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        _note(f"cannot read image {path}: {e.strerror}")
        return None


def run_chat(args: argparse.Namespace) -> int:
    """The read-answer loop; 0 when the user leaves, 2 if an --image cannot be read."""
    from vlmserve_client import APIConnectionError, Client, VlmserveError, user_message

    pending: list[bytes] = []
    for path in args.image:
        data = _read_image(path)
        if data is None:
            return 2
        pending.append(data)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (line editing and recall for input())
    options: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                               "seed": args.seed, "system": args.system}
    history: list[dict[str, Any]] = []
    with Client(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=0) as client:
        if interactive:
            _note(f"vlmserve chat with {client.base_url}: {HELP}")
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                return 0
            except KeyboardInterrupt:
                print()
                return 0
            if not line:
                continue
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                if command in ("/quit", "/exit"):
                    return 0
                if command == "/reset":
                    history.clear()
                    pending.clear()
                    _note("(a new conversation)")
                elif command == "/image" and arg.strip():
                    data = _read_image(arg.strip())
                    if data is not None:
                        pending.append(data)
                        _note(f"(attached {arg.strip()}: it goes with your next message)")
                else:
                    _note(HELP)
                continue
            parts: list[str] = []
            try:
                with client.chat_stream(line, images=pending, history=history, **options) as stream:
                    for delta in stream:
                        sys.stdout.write(delta.lstrip() if not parts else delta)
                        sys.stdout.flush()
                        parts.append(delta)
                print()
            except KeyboardInterrupt:
                print(" [stopped]")
            except VlmserveError as e:
                if parts:
                    print()
                status = "" if isinstance(e, APIConnectionError) else f"HTTP {e.status}: "
                _note(f"error: {status}{e.message}" + (" (the images attached to it are dropped)" if pending else ""))
                pending.clear()
                continue
            if parts:
                history += [user_message(line, pending), {"role": "assistant", "content": "".join(parts)}]
            pending.clear()
