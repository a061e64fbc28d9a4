"""A loopback HTTP server that speaks the Groq and OpenAI chat-completions API, for tests and benchmarks.

Groq's SDK posts to /openai/v1/chat/completions, OpenAI's to /v1/chat/completions; both are served. Answers come
from ``answer_for(text)``; a wrong key gets a real 401, a retired model Groq's 400 ``model_decommissioned``.
"""

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHAT_PATHS = ("/openai/v1/chat/completions", "/v1/chat/completions")


def default_answer(text: str) -> str:
    words = text.rstrip(".").split()
    return f"{words[0]}|is followed by|{words[-1]}"


class FakeProvider:
    def __init__(
        self,
        api_key: str = "test-key",
        models: tuple[str, ...] = ("teacher-model",),
        retired: tuple[str, ...] = ("llama3-70b-8192",),
        answer_for: Callable[[str], str] = default_answer,
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.retired = retired
        self.answer_for = answer_for
        self.requests: list[dict] = []  # every accepted request body, in arrival order
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeProvider":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, code: str) -> None:
                self._reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path not in CHAT_PATHS:
                    return self._error(404, f"Unknown request URL: POST {self.path}", "unknown_url")
                if self.headers.get("Authorization") != f"Bearer {provider.api_key}":
                    return self._error(401, "Invalid API Key", "invalid_api_key")
                model = body.get("model")
                if model in provider.retired:
                    return self._error(
                        400,
                        f"The model `{model}` has been decommissioned and is no longer supported.",
                        "model_decommissioned",
                    )
                if model not in provider.models:
                    return self._error(404, f"The model `{model}` does not exist.", "model_not_found")
                with provider.lock:
                    provider.requests.append(body)
                    provider.paths.append(self.path)
                text = body["messages"][-1]["content"]
                answer = provider.answer_for(text)
                prompt_tokens = sum(len(message["content"].split()) for message in body["messages"])
                self._reply(
                    200,
                    {
                        "id": f"chatcmpl-{len(provider.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(answer.split()),
                            "total_tokens": prompt_tokens + len(answer.split()),
                        },
                    },
                )

        return Handler
