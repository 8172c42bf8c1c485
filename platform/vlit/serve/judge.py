"""The judge deployment: the VLFeedback rubric over one backend, in dynamic batches
(`@serve.batch`); all aspect prompts of a batch go to the backend together."""
from __future__ import annotations

from ray import serve

from vlit.config import JudgeConfig
from vlit.serve.backends import JudgeItem, make_backend
from vlit.serve.llm import model_id
from vlit.serve.protocol import AspectScore
from vlit.serve.replica import ReplicaCore, unwrap


@serve.deployment
class Judge:
    def __init__(self, name: str, cfg: JudgeConfig, engine=None):
        self.backend = make_backend(cfg.backend, engine, model_id("judge", name))
        self.core = ReplicaCore(f"judge-{name}", self.backend, cfg.deployment)
        self.core.configure(self.score_batch)

    async def score(self, item: JudgeItem) -> dict[str, AspectScore]:
        self.backend.check_judge(item)
        return unwrap(await self.score_batch(item))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, items: list[JudgeItem]) -> list:
        return await self.core.run(self.backend.judge, items)

    def check_health(self) -> None:
        self.core.check_health()

    def stats(self) -> dict:
        return self.core.stats()
