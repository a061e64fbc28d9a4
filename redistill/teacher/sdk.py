"""A teacher behind an official SDK (groq or openai): both expose the same chat-completions surface."""

from redistill.teacher.base import Completion, TeacherError

# Provider error codes that mean "this model name will never work".
_GONE_MODEL_CODES = {"model_decommissioned", "model_not_found"}


class SdkTeacher:
    def __init__(self, client: object, model: str, sampling: dict, key_variable: str) -> None:
        self.client = client
        self.model = model
        self.sampling = sampling
        self.key_variable = key_variable

    def complete(self, messages: list[dict]) -> Completion:
        extra = {"reasoning_effort": self.sampling["reasoning_effort"]} if self.sampling["reasoning_effort"] else None
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=self.sampling["temperature"],
                max_tokens=self.sampling["max_tokens"],
                top_p=self.sampling["top_p"],
                extra_body=extra,
            )
        except Exception as error:
            raise self._explain(error) from None
        if not getattr(response, "choices", None):
            raise TeacherError(
                f"teacher at {self.client.base_url} answered with no choices; is it a chat-completions server?"
            )
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )

    def _explain(self, error: Exception) -> TeacherError:
        status = getattr(error, "status_code", None)
        body = getattr(error, "body", None)
        detail = body.get("error", body) if isinstance(body, dict) else body
        code = detail.get("code") if isinstance(detail, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else str(error)
        message = " ".join(str(message).split())
        if status in (401, 403):
            return TeacherError(f"teacher rejected the API key ({status}: {message}); check {self.key_variable}")
        if status == 404 or code in _GONE_MODEL_CODES:
            return TeacherError(
                f"teacher model {self.model!r} is not available ({status}: {message}); "
                "set teacher.model to one the provider lists as current (README: Choosing a teacher model)"
            )
        if status == 400:
            return TeacherError(f"teacher rejected the request (400: {message}); check the teacher.* params")
        if status is not None:
            return TeacherError(
                f"teacher kept failing ({status}: {message}) after teacher.max_retries retries; "
                "re-run to resume, answers received so far are kept"
            )
        return TeacherError(
            f"could not reach the teacher at {self.client.base_url} ({type(error).__name__}: {message}); "
            "check teacher.base_url and the network, then re-run to resume"
        )
