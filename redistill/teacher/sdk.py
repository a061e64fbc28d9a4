"""A teacher behind an official async SDK (groq or openai): both expose the same chat-completions surface."""

import inspect

from redistill.teacher.base import Completion, RetryableError, TeacherError, completion_from_body
from redistill.teacher.limiter import retry_after_seconds

# Provider error codes that mean "this model name will never work".
_GONE_MODEL_CODES = {"model_decommissioned", "model_not_found"}
_RETRYABLE_STATUS = {408, 409, 429}


class SdkTeacher:
    def __init__(self, client: object, model: str, sampling: dict, key_variable: str) -> None:
        self.client = client  # groq.AsyncGroq or openai.AsyncOpenAI, with the SDK's own retries off
        self.model = model
        self.sampling = sampling
        self.key_variable = key_variable

    def request_body(self, messages: list[dict]) -> dict:
        """The chat-completions request, as sent online and as written into a batch file."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.sampling["temperature"],
            "max_tokens": self.sampling["max_tokens"],
            "top_p": self.sampling["top_p"],
        }
        if self.sampling["reasoning_effort"]:
            body["reasoning_effort"] = self.sampling["reasoning_effort"]
        return body

    async def complete(self, messages: list[dict]) -> Completion:
        """The answer to ``messages``; the body is checked by completion_from_body, never trusted to the SDK's
        lenient parsing (which lets ``choices: "x"`` or a numeric content through as attributes)."""
        body = self.request_body(messages)
        extra = {"reasoning_effort": body.pop("reasoning_effort")} if "reasoning_effort" in body else None
        try:
            raw = await self.client.chat.completions.with_raw_response.create(**body, extra_body=extra)
            # groq's async raw response reads asynchronously; openai's (legacy) one has read its content already
            content = raw.read() if hasattr(raw, "read") else raw.content
            if inspect.isawaitable(content):
                content = await content
        except Exception as error:
            raise self.explain(error) from None
        return completion_from_body(content, raw.headers)

    async def aclose(self) -> None:
        """Close the SDK's connections inside the event loop that opened them (not at exit, with a traceback)."""
        await self.client.close()

    def explain(self, error: Exception) -> TeacherError | RetryableError:
        """Sort an SDK exception into one the run must stop for, and one worth retrying."""
        status = getattr(error, "status_code", None)
        body = getattr(error, "body", None)
        detail = body.get("error", body) if isinstance(body, dict) else body
        code = detail.get("code") if isinstance(detail, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else str(error)
        message = " ".join(str(message).split())
        response = getattr(error, "response", None)
        headers = getattr(response, "headers", None) if status is not None else None
        if status in (401, 403):
            return TeacherError(f"teacher rejected the API key ({status}: {message}); check {self.key_variable}")
        if code in _GONE_MODEL_CODES or (status == 404 and "model" in message.lower()):
            return TeacherError(
                f"teacher model {self.model!r} is not available ({status}: {message}); "
                "set teacher.model to one the provider lists as current (README: Choosing a teacher model)"
            )
        if status == 404:
            return TeacherError(
                f"the teacher at {self.client.base_url} has no chat-completions endpoint (404: {message}); "
                "check teacher.base_url (for openai it ends in /v1)"
            )
        if status in _RETRYABLE_STATUS or (status is not None and status >= 500):
            return RetryableError(str(status), message, retry_after_seconds(headers), headers)
        if status is not None:
            return TeacherError(f"teacher rejected the request ({status}: {message}); check the teacher.* params")
        kind = type(error).__name__
        if kind == "APITimeoutError":
            return RetryableError("timeout", message)
        if kind == "APIConnectionError":
            # ConnectError (httpx's, or httpx2's for openai): no connection was made at all (refused, no such host),
            # unlike a connection the server dropped mid-answer.
            cause = "unreachable" if type(error.__cause__).__name__ == "ConnectError" else "connection"
            return RetryableError(cause, f"could not reach the teacher at {self.client.base_url}: {message}")
        if kind == "APIResponseValidationError" or isinstance(error, ValueError):
            return RetryableError("malformed_response", message)
        raise error
