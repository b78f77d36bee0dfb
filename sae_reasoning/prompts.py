"""Prompt formats shared by every stage (METHOD.md steps 6-7).

The base model is prompted in plain text; the thinking model through its own chat template
(see ``models.thinking_prompt``). Keep these strings in one place: the organism's base corpus,
steering-vector training and the hybrid generator must all see exactly the same base prompt.
"""

BASE_TASK = "Answer the question below. Explain your reasoning step by step."


def base_prompt(question: str) -> str:
    """The base-model prompt of the paper: ``Task: … Question: … Step by step answer:``."""
    return f"Task: {BASE_TASK}\nQuestion: {question.strip()}\nStep by step answer:"
