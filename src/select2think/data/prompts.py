"""The instruction every math prompt carries."""

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_prompt(question: str, instruction: str = INSTRUCTION) -> str:
    return f"{question.strip()}\n{instruction}"
