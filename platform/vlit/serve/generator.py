"""The generator deployment: one named model of the pool, answering chat requests in
dynamic batches (`@serve.batch`)."""
from __future__ import annotations

from ray import serve

from vlit.config import GeneratorConfig
from vlit.serve.backends import Generation, GenerationRequest, make_backend
from vlit.serve.llm import model_id
from vlit.serve.replica import ReplicaCore, unwrap


@serve.deployment
class Generator:
    def __init__(self, name: str, cfg: GeneratorConfig, engine=None):
        self.backend = make_backend(cfg.backend, engine, model_id("generator", name))
        self.core = ReplicaCore(f"generator-{name}", self.backend, cfg.deployment)
        self.core.configure(self.generate_batch)

    async def generate(self, req: GenerationRequest) -> Generation:
        # Checked alone, before batching: a bad request fails by itself, never its batch.
        self.backend.check(req)
        return unwrap(await self.generate_batch(req))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, reqs: list[GenerationRequest]) -> list:
        return await self.core.run(self.backend.generate, reqs)

    def check_health(self) -> None:  # called by Serve every health_check_period_s
        self.core.check_health()

    def stats(self) -> dict:
        return self.core.stats()
