"""The instruction the teacher is given, and the chat messages built around one sentence."""

# The post's prompt with its typos fixed ("annontator", "entitity2"); its example is kept.
DEFAULT_SYSTEM_PROMPT = (
    "You are an experienced annotator. Extract all entities and the relations between them from the following "
    "text. Write the answer as a triple entity1|relationship|entity2. Do not add anything else.\n"
    "Example Text: Alice is from France.\n"
    "Answer: Alice|is from|France."
)


def chat_messages(text: str, system_prompt: str) -> list[dict]:
    """The system prompt, then the sentence as the user's turn (as the post asked the teacher)."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
