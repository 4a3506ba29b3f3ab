"""The on-call console: one server-rendered page at `/` over the JSON API, with its script and style sheet."""

from healer.console.routes import CONSOLE_ACCESS, SIGNED_IN_ACCESS, ConsoleAccess, add_console_routes

__all__ = ["CONSOLE_ACCESS", "SIGNED_IN_ACCESS", "ConsoleAccess", "add_console_routes"]
