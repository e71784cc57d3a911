"""The project's server with instrumentation: for round-trip counts and profiles only.

Measured runs start the project exactly as deployed (``rpc-server serve``). This launcher
starts the same thing (settings from ``RPC_SERVER_*``, the CLI's logging,
``rpc_server.server.serving.run_server``) with the app that ``create_app`` builds wrapped by
``instrumentation.attach`` (``--count-to``, ``--profile-to``).

    python -m tests.benchmarks.project_server --port P [--count-to PATH] [--profile-to PREFIX]
"""

from __future__ import annotations

import argparse

from aiohttp import web

from rpc_server.config import Settings
from rpc_server.log_output import configure_logging
from rpc_server.server import serving
from tests.benchmarks import instrumentation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    instrumentation.add_arguments(parser)
    args = parser.parse_args()
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    # run_server builds its app with the create_app it imported: wrap that one.
    create_app = getattr(serving, "create_app")  # noqa: B009

    def create_instrumented_app(settings: Settings) -> web.Application:
        app: web.Application = create_app(settings)
        instrumentation.attach(app, args)
        return app

    setattr(serving, "create_app", create_instrumented_app)  # noqa: B010
    serving.run_server(settings, args.host, args.port)


if __name__ == "__main__":
    main()
