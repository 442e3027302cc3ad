"""Two in-process engines loading at once (two gateways in one process, as `loraplex migrate`'s
tests and any embedding application run them) both serve a whole model: transformers builds a
model on the meta device by patching torch while it loads, so an unserialised second load came
out with its lm_head on meta ("Cannot copy out of meta tensor", 10 loads of 12 here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving.engines.base import EngineRequest
from serving.engines.transformers import TransformersEngine
from tests.serving.conftest import Reference, clean
from tests.serving.servingdata import QUESTIONS


def test_two_engines_loading_at_once_both_answer_as_the_reference(
    tiny_base: Path, reference: Reference
) -> None:
    question = QUESTIONS[0]
    expected = reference.chat(None, question, max_tokens=8)

    async def both() -> list[str]:
        engines = [TransformersEngine(load_base=lambda: tiny_base, threads=1) for _ in range(2)]
        await asyncio.gather(*(e.start() for e in engines))
        try:
            await asyncio.gather(*(e.wait_ready(120) for e in engines))
            body = {"model": "base", "messages": [{"role": "user", "content": question}],
                    "max_tokens": 8, "temperature": 0}  # fmt: skip
            answers = await asyncio.gather(
                *(
                    e.complete(EngineRequest(endpoint="chat", body=body, adapter=None))
                    for e in engines
                )
            )
        finally:
            await asyncio.gather(*(e.close() for e in engines))
        return [clean(a["choices"][0]["message"]["content"]) for a in answers]

    for _ in range(3):  # the race lost most rounds before the fix
        assert asyncio.run(both()) == [expected, expected]
